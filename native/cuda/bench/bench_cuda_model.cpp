// bench_cuda_model: the CUDA model runner (cuda_model.h) on mamba-130m- and mamba2-130m-shaped models
// with random weights (bf16 on the device, the runner's default).
//
//   decode: tokens/s of step() at batch 1 and 64, each with and without the CUDA graph; a step
//           includes copying the ids in and synchronising (what a host-side sampling loop does).
//           dec-async: graphs enqueued back to back with one synchronisation per 50 steps (the same
//           ids each step), i.e. the device's own time per step without the host round trip.
//           Against the weight-read bound: every weight byte read once per step, at the device's
//           measured copy bandwidth (cudaMemcpy D2D of 1 GiB, bytes read + written).
//   prefill: tokens/s of forward() on one 2048-token prompt (logits of the last token only).
// Times: host clock around whole synchronised calls, after warm-up; median of repeats.
// Prints a table and one JSON line. Runs in well under 2 minutes.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_model.h"
#include "bench_util.h"

using namespace mssm;
using namespace mssm::cuda::bench;

const char* const mssm::cuda::bench::kProgram = "bench_cuda_model";

namespace {


double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Uniform values in [lo, hi) from a counter hash.
void fill(std::vector<float>& v, float lo, float hi, uint64_t seed) {
  for (size_t i = 0; i < v.size(); ++i) {
    uint64_t z = (seed * 0x100000001b3ull + i) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    v[i] = lo + (hi - lo) * (float)((z >> 40) * (1.0 / 16777216.0));
  }
}

struct Weights {
  std::vector<std::vector<float>> storage;
  std::unordered_map<std::string, model::Weight> map;
};

Weights random_weights(const model::Config& c) {
  Weights w;
  const auto specs = model::expected_weights(c);
  w.storage.reserve(specs.size());
  uint64_t seed = 1;
  for (const auto& spec : specs) {
    int64_t n = 1;
    for (int64_t s : spec.shape) n *= s;
    w.storage.emplace_back(n);
    std::vector<float>& v = w.storage.back();
    const std::string& name = spec.name;
    auto ends = [&](const std::string& suffix) {
      return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    if (spec.matrix) {
      const float a = name == "embeddings" ? 1.0f : std::sqrt(3.0f / (float)spec.shape[1]);
      fill(v, -a, a, seed++);
    } else if (ends("norm") || ends("norm_f")) {
      fill(v, 0.5f, 1.5f, seed++);
    } else if (ends(".A")) {
      fill(v, -4.0f, -0.5f, seed++);
    } else if (ends("dt_bias")) {
      fill(v, -4.5f, -1.0f, seed++);
    } else if (ends(".D")) {
      fill(v, -1.0f, 1.0f, seed++);
    } else {
      fill(v, -0.5f, 0.5f, seed++);
    }
    w.map[name] = model::Weight{v.data(), DType::f32, spec.shape, n * 4};
  }
  return w;
}

template <typename F>
double median_s(F body, int warmup, int repeats) {
  for (int i = 0; i < warmup; ++i) body();
  std::vector<double> t;
  for (int r = 0; r < repeats; ++r) {
    const double t0 = now_s();
    body();
    t.push_back(now_s() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::string json;
void add_json(const std::string& field) { json += (json.empty() ? "" : ",") + field; }

}  // namespace

int main() {
  const double t_start = now_s();
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "bench_cuda_model: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs; cuBLAS in this build: %s\n", prop.name, prop.multiProcessorCount,
              cuda::have_cublas() ? "yes" : "no");

  // Copy bandwidth (bytes read + written).
  const size_t copy_bytes = size_t(1) << 30;
  void *src = nullptr, *dst = nullptr;
  CK(cudaMalloc(&src, copy_bytes));
  CK(cudaMalloc(&dst, copy_bytes));
  CK(cudaMemset(src, 1, copy_bytes));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> copy_ms;
  for (int r = 0; r < 12; ++r) {
    CK(cudaEventRecord(e0));
    CK(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice));
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= 2) copy_ms.push_back(ms);
  }
  std::sort(copy_ms.begin(), copy_ms.end());
  const double bw = 2.0 * copy_bytes / (copy_ms[copy_ms.size() / 2] * 1e-3);
  CK(cudaFree(src));
  CK(cudaFree(dst));
  std::printf("copy bandwidth (D2D, read+write): %.0f GB/s\n\n", bw / 1e9);
  add_json("\"device\":\"" + std::string(prop.name) + "\"");
  add_json("\"copy_GBps\":" + std::to_string(bw / 1e9));
  add_json(std::string("\"cublas\":") + (cuda::have_cublas() ? "true" : "false"));

  model::Config m1;
  m1.architecture = model::Architecture::mamba1;
  m1.hidden_size = 768, m1.num_layers = 24, m1.vocab_size = 50280, m1.intermediate_size = 1536;
  m1.state_size = 16, m1.conv_kernel = 4, m1.time_step_rank = 48, m1.tie_embeddings = true;
  model::Config m2;
  m2.architecture = model::Architecture::mamba2;
  m2.hidden_size = 768, m2.num_layers = 24, m2.vocab_size = 50288, m2.intermediate_size = 1536;
  m2.state_size = 128, m2.conv_kernel = 4, m2.num_heads = 24, m2.head_dim = 64, m2.num_groups = 1;
  m2.chunk_size = 256, m2.tie_embeddings = true;

  std::printf("%-12s %-8s %6s %6s %12s %12s %12s %10s\n", "model", "phase", "batch", "graph", "ms/step", "tokens/s",
              "bound ms", "of bound");
  std::string rows_json;
  for (const auto& [name, cfg] : {std::pair<const char*, model::Config>{"mamba-130m", m1}, {"mamba2-130m", m2}}) {
    Weights w = random_weights(cfg);
    std::unique_ptr<cuda::CudaModel> m;
    check(cuda::CudaModel::create(cfg, w.map, {}, &m));
    w = Weights{};  // the device holds its own copy
    const double bound_ms = m->weight_bytes() / bw * 1e3;
    auto row = [&](const char* phase, int64_t batch, int graph, double ms, double tps, bool bounded) {
      std::printf("%-12s %-8s %6lld %6s %12.3f %12.0f %12s %10s\n", name, phase, (long long)batch,
                  graph < 0 ? "-" : graph ? "yes" : "no", ms, tps,
                  bounded ? std::to_string(bound_ms).substr(0, 6).c_str() : "-",
                  bounded ? (std::to_string(100 * bound_ms / ms).substr(0, 5) + "%").c_str() : "-");
      rows_json += (rows_json.empty() ? "" : ",") + std::string("{\"model\":\"") + name + "\",\"phase\":\"" + phase +
                   "\",\"batch\":" + std::to_string(batch) + ",\"graph\":" + (graph > 0 ? "true" : "false") +
                   ",\"ms\":" + std::to_string(ms) + ",\"tokens_per_s\":" + std::to_string(tps) +
                   (bounded ? ",\"weight_read_bound_ms\":" + std::to_string(bound_ms) : std::string()) + "}";
    };
    std::printf("%-12s weights on device: %.1f MB (bf16 matrices, f32 vectors); weight-read bound %.3f ms/step\n",
                name, m->weight_bytes() / 1e6, bound_ms);
    for (int64_t batch : {1, 64}) {
      float *conv = nullptr, *ssm = nullptr, *logits = nullptr;
      CK(cudaMalloc(&conv, m->conv_state_floats(batch) * 4));
      CK(cudaMalloc(&ssm, m->ssm_state_floats(batch) * 4));
      CK(cudaMalloc(&logits, batch * cfg.vocab_size * 4));
      CK(cudaMemset(conv, 0, m->conv_state_floats(batch) * 4));
      CK(cudaMemset(ssm, 0, m->ssm_state_floats(batch) * 4));
      std::vector<int32_t> ids(batch);
      uint32_t r = 12345;
      cuda::StepArgs a;
      a.ids = ids.data(), a.batch = batch, a.conv_state = conv, a.ssm_state = ssm, a.logits = logits;
      double ms_graph[2] = {0, 0};
      for (int graph : {0, 1}) {
        m->set_use_graphs(graph);
        const int steps = 50;
        const double s = median_s(
            [&] {
              for (int i = 0; i < steps; ++i) {
                for (auto& id : ids) id = (int32_t)((r = r * 1664525u + 1013904223u) % cfg.vocab_size);
                check(m->step(a));
              }
            },
            1, 5);
        ms_graph[graph] = s / steps * 1e3;
        row("decode", batch, graph, ms_graph[graph], batch / (s / steps), true);
      }
      std::printf("%-12s graph saves %.1f%% of a step at batch %lld (%.3f -> %.3f ms)\n", name,
                  100 * (1 - ms_graph[1] / ms_graph[0]), (long long)batch, ms_graph[0], ms_graph[1]);
      {  // The device's own time per step: graphs enqueued back to back, one synchronisation per 50.
        m->set_use_graphs(true);
        a.synchronize = false;
        const int steps = 50;
        const double s = median_s(
            [&] {
              for (int i = 0; i < steps; ++i) check(m->step(a));
              CK(cudaStreamSynchronize(m->stream()));
            },
            1, 5);
        a.synchronize = true;
        row("dec-async", batch, 1, s / steps * 1e3, batch / (s / steps), true);
      }
      CK(cudaFree(conv));
      CK(cudaFree(ssm));
      CK(cudaFree(logits));
    }
    {
      const int64_t L = 2048;
      std::vector<int32_t> ids(L);
      for (int64_t i = 0; i < L; ++i) ids[i] = (int32_t)((i * 7919 + 13) % cfg.vocab_size);
      float* logits = nullptr;
      CK(cudaMalloc(&logits, cfg.vocab_size * 4));
      cuda::ForwardArgs f;
      f.ids = ids.data(), f.lengths = &L, f.sequences = 1, f.last_only = true, f.logits = logits;
      const double s = median_s([&] { check(m->forward(f)); }, 1, 5);
      row("prefill", L, -1, s * 1e3, L / s, false);
      CK(cudaFree(logits));
    }
  }
  add_json("\"rows\":[" + rows_json + "]");
  std::printf("\nbench_cuda_model: %.1f s\nJSON {%s}\n", now_s() - t_start, json.c_str());
  return 0;
}
