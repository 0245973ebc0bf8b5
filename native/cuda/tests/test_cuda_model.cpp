// The CUDA model runner (cuda_model.h) against the CPU runner (model/mamba_model.h) on tiny random
// models of both architectures with awkward sizes (Mamba-1: d 37, d_inner 74, N 5, dt rank 7, biases,
// untied head; Mamba-2: d 48, 6 heads × 16, 2 groups, N 12, tied), each also with mixture-of-experts
// blocks among its layers (moe.cu's routing, grouped expert products and combine). For each host weight dtype and
// upload choice: a prefill of 3 sequences (lengths 1, 45, 70; all logits and the states; the GPU in
// segments of 40 tokens so states carry between segments, rows >= 32 through the tiled / cuBLAS GEMM
// and the 1-token sequence through the weight-streaming one), a last-only prefill, then 4 decode steps
// of the batch of 3 (2 replayed from a CUDA graph, 2 launched directly) checked step by step, and a
// decode step at batch 33 from random states. Outputs are poisoned with NaN first.
//
// Tolerances, relative to |want| + 0.1·RMS(want) (the floor the brief sets for logits; states alike):
//   1e-4  f32 upload of f32 / f16 / q8_0 host weights (the CPU runner decodes f16 and q8_0 to f32 too,
//         so both sides use the same weight values and differ in fp32 summation order only), with the
//         fp32 SSD; cuBLAS (when built) does fp32 GEMMs without TF32.
//   1e-3  bf16 upload (of bf16 host weights, or of f32 ones rounded at upload) against the CPU runner
//         on the same bf16 weights: the same weight values again; what differs is the summation order,
//         the Mamba-2 prefill's split-bf16 SSD (≈1e-4 of the output's scale, ssd.cu) and, with cuBLAS,
//         the activations split into bf16 hi + lo (16 bits of mantissa, ≈1e-5).
// The bf16 upload is not compared against the f32 weights: rounding only the weights of these random
// tiny models to bf16 moves their prefill logits, on this measure, by 0.076 (Mamba-1) and 0.14
// (Mamba-2) on the CPU runner alone (a property of the models, not of either runner), so no tolerance
// ≤ 2e-2 could hold there; the f32 upload is the runner's check against f32 weights.
#include <cstring>
#include <memory>

#include "cuda_model.h"
#include "model/mamba_model.h"
#include "test_cuda_util.h"

using namespace mssm;
using namespace mssm::test;

namespace {

struct HostWeights {
  std::unordered_map<std::string, std::vector<uint8_t>> storage;
  std::unordered_map<std::string, model::Weight> map;
};

// Random f32 values for every canonical weight, in ranges a trained model has (A < 0, dt bias giving a
// softplus of 0.01 to 0.3, norms near 1, matrices of scale 1/√K).
std::unordered_map<std::string, std::vector<float>> random_weights(const model::Config& c, Rng& rng) {
  std::unordered_map<std::string, std::vector<float>> out;
  for (const auto& spec : model::expected_weights(c)) {
    int64_t n = 1;
    for (int64_t s : spec.shape) n *= s;
    const std::string& name = spec.name;
    auto ends = [&](const char* suffix) {
      const size_t k = std::strlen(suffix);
      return name.size() >= k && name.compare(name.size() - k, k, suffix) == 0;
    };
    std::vector<float> v;
    if (spec.matrix) {
      const float scale = name == "embeddings" ? 1.0f : 1.0f / std::sqrt((float)spec.shape.back());
      v = rng.normals(n, scale);
    } else if (ends("norm") || ends("norm_f")) {
      v = rng.uniforms(n, 0.5f, 1.5f);
    } else if (ends(".A")) {
      v = rng.uniforms(n, -4.0f, -0.5f);
    } else if (ends("dt_bias")) {
      v = rng.uniforms(n, -4.5f, -1.0f);
    } else if (ends(".D")) {
      v = rng.uniforms(n, -1.0f, 1.0f);
    } else if (ends(".conv")) {
      v = rng.uniforms(n, -0.6f, 0.6f);
    } else {  // biases
      v = rng.normals(n, 0.1f);
    }
    out[name] = std::move(v);
  }
  return out;
}

// The weights as host tensors: matrices in `dtype` (q8_0 only where a row holds whole blocks, else f32).
HostWeights host_weights(const model::Config& c, const std::unordered_map<std::string, std::vector<float>>& f32,
                         DType dtype) {
  HostWeights h;
  const auto& k = reference_kernels();
  for (const auto& spec : model::expected_weights(c)) {
    const std::vector<float>& v = f32.at(spec.name);
    DType t = spec.matrix ? dtype : DType::f32;
    if (t == DType::q8_0 && spec.shape.back() % kQ8BlockSize != 0) t = DType::f32;
    const int64_t n = (int64_t)v.size(), bytes = dtype_bytes(t, n);
    std::vector<uint8_t>& buf = h.storage[spec.name];
    buf.resize(bytes);
    if (t == DType::f32)
      std::memcpy(buf.data(), v.data(), bytes);
    else
      k.convert(v.data(), DType::f32, buf.data(), t, n);
    h.map[spec.name] = model::Weight{buf.data(), t, spec.shape, bytes};
  }
  return h;
}

std::vector<float> download(const DeviceBuffer& b) { return b.download(); }

struct Case {
  const char* name;
  DType host;          // the GPU runner's host weights
  DType reference;     // the CPU runner's host weights
  cuda::WeightDType upload;
  cuda::GemmBackend gemm;
  cuda::SsdMath ssd;
  double tol;
};

void run_case(const char* model_name, const model::Config& c, const std::unordered_map<std::string, std::vector<float>>& f32,
              const Case& k, Rng& rng) {
  const std::string tag = std::string(model_name) + " " + k.name;
  std::printf("  %s\n", tag.c_str());
  HostWeights gpu_w = host_weights(c, f32, k.host), cpu_w = host_weights(c, f32, k.reference);
  model::Model cpu(c, cpu_w.map);
  cuda::ModelOptions opt;
  opt.weights = k.upload;
  opt.gemm = k.gemm;
  opt.ssd_math = k.ssd;
  std::unique_ptr<cuda::CudaModel> gpu;
  const cuda::Status st = cuda::CudaModel::create(c, gpu_w.map, opt, &gpu);
  MSSM_CHECK(st.ok(), "%s: create: %s", tag.c_str(), st.message.c_str());
  if (!gpu) return;
  const int64_t V = c.vocab_size;
  auto close = [&](const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
    expect_gpu_close(tag + " " + what, got, want, k.tol, 0.1 * rms(want.data(), (int64_t)want.size()));
  };

  // Prefill of 3 sequences, all logits and the states.
  const int64_t lengths[3] = {1, 45, 70};
  const int64_t total = 116, S = 3;
  std::vector<int32_t> ids(total);
  for (auto& t : ids) t = (int32_t)(rng.next() % V);
  std::vector<float> want_logits(total * V), want_conv(cpu.conv_state_floats(S)), want_ssm(cpu.ssm_state_floats(S));
  model::ForwardArgs fa;
  fa.ids = ids.data(), fa.lengths = lengths, fa.sequences = S, fa.logits = want_logits.data();
  fa.conv_state = want_conv.data(), fa.ssm_state = want_ssm.data();
  cpu.forward(fa);
  DeviceBuffer logits(total * V), conv(want_conv.size()), ssm(want_ssm.size());
  logits.poison(), conv.poison(), ssm.poison();
  cuda::ForwardArgs ga;
  ga.ids = ids.data(), ga.lengths = lengths, ga.sequences = S, ga.logits = logits.ptr;
  ga.conv_state = conv.ptr, ga.ssm_state = ssm.ptr, ga.segment_tokens = 40;
  cuda::Status s = gpu->forward(ga);
  MSSM_CHECK(s.ok(), "%s: forward: %s", tag.c_str(), s.message.c_str());
  close("prefill logits", download(logits), want_logits);
  close("prefill conv state", download(conv), want_conv);
  close("prefill ssm state", download(ssm), want_ssm);

  // Last-only prefill without states, default segments.
  std::vector<float> want_last(S * V);
  model::ForwardArgs fl;
  fl.ids = ids.data(), fl.lengths = lengths, fl.sequences = S, fl.logits = want_last.data(), fl.last_only = true;
  cpu.forward(fl);
  DeviceBuffer last(S * V);
  last.poison();
  cuda::ForwardArgs gl;
  gl.ids = ids.data(), gl.lengths = lengths, gl.sequences = S, gl.logits = last.ptr, gl.last_only = true;
  s = gpu->forward(gl);
  MSSM_CHECK(s.ok(), "%s: forward last: %s", tag.c_str(), s.message.c_str());
  close("last-only logits", download(last), want_last);

  // 4 decode steps of the batch of 3, from the prefill's states (the CPU's own, so each step's check
  // is of that step alone): steps 0-1 replay a graph, 2-3 launch directly.
  conv.upload(want_conv), ssm.upload(want_ssm);
  DeviceBuffer step_logits(S * V);
  for (int t = 0; t < 4; ++t) {
    gpu->set_use_graphs(t < 2);
    int32_t step_ids[3];
    for (auto& id : step_ids) id = (int32_t)(rng.next() % V);
    std::vector<float> want(S * V);
    model::StepArgs sa;
    sa.ids = step_ids, sa.batch = S, sa.conv_state = want_conv.data(), sa.ssm_state = want_ssm.data();
    sa.logits = want.data();
    cpu.step(sa);
    step_logits.poison();
    cuda::StepArgs ss;
    ss.ids = step_ids, ss.batch = S, ss.conv_state = conv.ptr, ss.ssm_state = ssm.ptr, ss.logits = step_logits.ptr;
    s = gpu->step(ss);
    MSSM_CHECK(s.ok(), "%s: step %d: %s", tag.c_str(), t, s.message.c_str());
    close("step " + std::to_string(t) + (t < 2 ? " (graph)" : "") + " logits", download(step_logits), want);
    close("step " + std::to_string(t) + " conv state", download(conv), want_conv);
    close("step " + std::to_string(t) + " ssm state", download(ssm), want_ssm);
    conv.upload(want_conv), ssm.upload(want_ssm);
  }

  // Batch 33 (the large-M GEMM path in decode) from random states, one graph step.
  {
    gpu->set_use_graphs(true);
    const int64_t B = 33;
    std::vector<float> cs = rng.normals(cpu.conv_state_floats(B)), sst = rng.normals(cpu.ssm_state_floats(B), 0.5f);
    std::vector<int32_t> bid(B);
    for (auto& id : bid) id = (int32_t)(rng.next() % V);
    DeviceBuffer dc(cs), ds(sst), dl(B * V);
    dl.poison();
    std::vector<float> want(B * V);
    model::StepArgs sa;
    sa.ids = bid.data(), sa.batch = B, sa.conv_state = cs.data(), sa.ssm_state = sst.data(), sa.logits = want.data();
    cpu.step(sa);
    cuda::StepArgs ss;
    ss.ids = bid.data(), ss.batch = B, ss.conv_state = dc.ptr, ss.ssm_state = ds.ptr, ss.logits = dl.ptr;
    s = gpu->step(ss);
    MSSM_CHECK(s.ok(), "%s: step batch 33: %s", tag.c_str(), s.message.c_str());
    close("batch-33 step logits", download(dl), want);
    close("batch-33 step ssm state", download(ds), sst);
  }

  // Errors: a bad token id is refused before any work.
  int32_t bad = (int32_t)V;
  cuda::StepArgs sb;
  sb.ids = &bad, sb.batch = 1, sb.conv_state = conv.ptr, sb.ssm_state = ssm.ptr, sb.logits = step_logits.ptr;
  s = gpu->step(sb);
  MSSM_CHECK(!s.ok() && s.message.find("outside the vocabulary") != std::string::npos, "%s: bad id: '%s'",
             tag.c_str(), s.message.c_str());
}

}  // namespace

int main() {
  const int code = device_or_exit_code("test_cuda_model");
  if (code >= 0) return code;
  std::printf("cuBLAS in this build: %s\n", cuda::have_cublas() ? "yes" : "no");
  Rng rng(41);

  model::Config m1;
  m1.architecture = model::Architecture::mamba1;
  m1.hidden_size = 37, m1.num_layers = 2, m1.vocab_size = 101, m1.intermediate_size = 74, m1.state_size = 5;
  m1.conv_kernel = 4, m1.time_step_rank = 7, m1.use_bias = true, m1.tie_embeddings = false;

  model::Config m2;
  m2.architecture = model::Architecture::mamba2;
  m2.hidden_size = 48, m2.num_layers = 2, m2.vocab_size = 97, m2.intermediate_size = 96, m2.state_size = 12;
  m2.conv_kernel = 4, m2.num_heads = 6, m2.head_dim = 16, m2.num_groups = 2, m2.chunk_size = 16;
  m2.time_step_min = 0.001f, m2.time_step_max = 0.25f, m2.tie_embeddings = true;

  using cuda::GemmBackend;
  using cuda::SsdMath;
  using cuda::WeightDType;
  std::vector<Case> cases = {
      {"f32->f32 builtin", DType::f32, DType::f32, WeightDType::f32, GemmBackend::builtin, SsdMath::fp32, 1e-4},
      {"f16->f32 builtin", DType::f16, DType::f16, WeightDType::f32, GemmBackend::builtin, SsdMath::fp32, 1e-4},
      {"q8_0->f32 auto", DType::q8_0, DType::q8_0, WeightDType::f32, GemmBackend::automatic, SsdMath::fp32, 1e-4},
      {"bf16->bf16 builtin", DType::bf16, DType::bf16, WeightDType::bf16, GemmBackend::builtin, SsdMath::bf16_tensor,
       1e-3},
      {"f32->bf16 auto", DType::f32, DType::bf16, WeightDType::bf16, GemmBackend::automatic, SsdMath::bf16_tensor,
       1e-3},
  };
  if (cuda::have_cublas()) {
    cases.push_back(
        {"f32->f32 cublas", DType::f32, DType::f32, WeightDType::f32, GemmBackend::cublas, SsdMath::fp32, 1e-4});
    cases.push_back({"bf16->bf16 cublas", DType::bf16, DType::bf16, WeightDType::bf16, GemmBackend::cublas,
                     SsdMath::bf16_tensor, 1e-3});
  }
  // Mixture-of-experts blocks between (Mamba-1) and before (Mamba-2) the mixers: the states then skip
  // them. Mamba-1: 4 experts, top-2 softmax renormalised, silu, biases; Mamba-2: 3 experts, top-1
  // sigmoid, gelu_tanh. Decode at batch 3 runs the grouped skinny product, batch 33 the tiled one.
  model::Config m1moe = m1;
  m1moe.num_layers = 4;
  m1moe.moe.layers = {1, 3};
  m1moe.moe.experts = 4, m1moe.moe.top_k = 2, m1moe.moe.hidden = 24, m1moe.moe.bias = true;
  m1moe.moe.scoring = cpu::MoeScoring::softmax, m1moe.moe.renormalize = true, m1moe.moe.activation = cpu::Activation::silu;
  model::Config m2moe = m2;
  m2moe.num_layers = 3;
  m2moe.moe.layers = {0};
  m2moe.moe.experts = 3, m2moe.moe.top_k = 1, m2moe.moe.hidden = 40, m2moe.moe.bias = false;
  m2moe.moe.scoring = cpu::MoeScoring::sigmoid, m2moe.moe.renormalize = false;
  m2moe.moe.activation = cpu::Activation::gelu_tanh;

  for (const auto& [name, cfg] : {std::pair<const char*, model::Config>{"mamba1", m1}, {"mamba2", m2},
                                  {"mamba1-moe", m1moe}, {"mamba2-moe", m2moe}}) {
    const auto f32 = random_weights(cfg, rng);
    for (const Case& k : cases) run_case(name, cfg, f32, k, rng);
  }

  // Creation errors name the weight, like the CPU runner's.
  {
    const auto f32 = random_weights(m1, rng);
    HostWeights h = host_weights(m1, f32, DType::f32);
    h.map.erase("layers.1.x_proj");
    std::unique_ptr<cuda::CudaModel> gpu;
    const cuda::Status s = cuda::CudaModel::create(m1, h.map, {}, &gpu);
    MSSM_CHECK(!s.ok() && s.message.find("layers.1.x_proj") != std::string::npos && !gpu, "missing weight: '%s'",
               s.message.c_str());
  }
  return finish("test_cuda_model");
}
