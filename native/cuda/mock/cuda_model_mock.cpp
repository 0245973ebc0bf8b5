// The CUDA model runner's interface (native/cuda/cuda_model.h) implemented on the CPU runner, over the
// host-memory runtime of ./cuda_runtime.h, for the mock build of the Node addon (MAMBA_SSM_CUDA_MOCK):
// the bindings of native/napi/cuda.cpp then run end to end without a GPU. It holds the weights as the
// device would (matrices rounded to bf16 when asked, then widened to f32, which is what the device's
// products multiply by; vectors f32) and keeps the runner's argument checks that the bindings rely on.
// Nothing here is part of a real build.
#include <cstring>
#include <stdexcept>

#include "cuda_model.h"

namespace mssm::cuda {

bool have_cublas() { return false; }

struct CudaModel::Impl {
  std::vector<std::vector<float>> storage;
  std::unordered_map<std::string, model::Weight> weights;
  std::unique_ptr<model::Model> cpu;
};

bool CudaModel::uses_cublas() const { return false; }

namespace {
Status error(const char* op, const std::string& what) { return Status{std::string("mamba-ssm cuda ") + op + ": " + what}; }
}  // namespace

Status CudaModel::create(const model::Config& config, const std::unordered_map<std::string, model::Weight>& weights,
                         const ModelOptions& options, std::unique_ptr<CudaModel>* out) {
  out->reset();
  try {
    model::Model check(config, weights);
  } catch (const std::exception& e) {
    return error("model", e.what());
  }
  if (options.device != 0) return error("model", "device " + std::to_string(options.device) + " does not exist (1 present)");
  std::unique_ptr<CudaModel> m(new CudaModel());
  m->config_ = config;
  m->options_ = options;
  m->impl_.reset(new Impl());
  Impl& im = *m->impl_;
  const auto& k = cpu::kernels();
  int64_t bytes = 0;
  for (const auto& spec : model::expected_weights(config)) {
    auto it = weights.find(spec.name);
    if (it == weights.end()) continue;
    const model::Weight& w = it->second;
    int64_t n = 1;
    for (int64_t s : w.shape) n *= s;
    std::vector<float> v((size_t)n);
    k.convert(w.data, w.dtype, v.data(), DType::f32, n);
    if (spec.matrix && options.weights == WeightDType::bf16) {
      std::vector<uint16_t> h((size_t)n);
      k.convert(v.data(), DType::f32, h.data(), DType::bf16, n);
      k.convert(h.data(), DType::bf16, v.data(), DType::f32, n);
    }
    bytes += n * (spec.matrix && options.weights == WeightDType::bf16 ? 2 : 4);
    im.storage.push_back(std::move(v));
    im.weights[spec.name] = model::Weight{im.storage.back().data(), DType::f32, w.shape, n * 4};
  }
  im.cpu.reset(new model::Model(config, im.weights));
  m->weight_bytes_ = bytes;
  *out = std::move(m);
  return {};
}

CudaModel::~CudaModel() = default;

Status CudaModel::forward(const ForwardArgs& a) {
  model::ForwardArgs f;
  f.ids = a.ids, f.lengths = a.lengths, f.sequences = a.sequences, f.last_only = a.last_only;
  f.logits = a.logits, f.padded_length = a.padded_length, f.conv_state = a.conv_state, f.ssm_state = a.ssm_state;
  f.use_initial_state = a.use_initial_state, f.segment_tokens = a.segment_tokens;
  try {
    impl_->cpu->forward(f);
  } catch (const std::exception& e) {
    return error("forward", e.what());
  }
  return {};
}

Status CudaModel::step(const StepArgs& a) {
  model::StepArgs s;
  s.ids = a.ids, s.batch = a.batch, s.conv_state = a.conv_state, s.ssm_state = a.ssm_state, s.logits = a.logits;
  try {
    impl_->cpu->step(s);
  } catch (const std::exception& e) {
    return error("step", e.what());
  }
  return {};
}

// The sampler (sampling.cu) as the CPU's, row by row with the given draws.
size_t sample_workspace_bytes(int64_t rows, int64_t vocab) { return (size_t)(rows * 2 * vocab) * sizeof(float); }

Status sample(const float* logits, int64_t rows, int64_t vocab, const cpu::SamplingParams& params, const float* u,
              int32_t* out, void* workspace, cudaStream_t) {
  if (rows < 0 || vocab < 1) return error("sample", "rows must be >= 0 and vocab >= 1");
  for (int64_t r = 0; r < rows; ++r) {
    cpu::SamplingParams p = params;
    if (p.penalty_tokens) p.penalty_tokens += r * p.penalty_count;
    out[r] = cpu::kernels().sample(logits + r * vocab, vocab, p, u[r], static_cast<float*>(workspace) + r * 2 * vocab);
  }
  return {};
}

}  // namespace mssm::cuda
