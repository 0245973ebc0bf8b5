// The CUDA model runner: mssm::model::Model (native/model/mamba_model.h) on an NVIDIA GPU.
//
// Built from the same model::Config and the same host weights map (f32, f16, bf16 or q8_0 matrices;
// f32 vectors), checked exactly as the CPU runner checks them (the same messages). The weights are
// copied to the device once, at creation:
//   matrices (embeddings, lm_head, in_proj, x_proj, dt_proj, out_proj) as bf16 (Options::weights =
//     bf16, the default: half the bytes a decode step reads) or as f32 (WeightDType::f32: the CPU
//     runner's numbers to fp32 rounding). f16 and q8_0 host matrices are dequantised to f32 first,
//     then rounded to bf16 when bf16 is asked for; a bf16 host matrix uploaded as bf16 is copied as is.
//   every vector (norms, conv, biases, A, D) as f32.
// Activations, the residual stream and the states are f32; every product accumulates in f32.
//
// GEMMs y[M,N] = x[M,K]·W[N,K]ᵀ: a weight-streaming kernel of this library for M < 32 (decode: each
// weight read once for the batch, 16-byte loads), and for M >= 32 cuBLAS when the build found it
// (MSSM_HAVE_CUBLAS; f32 weights: fp32 GEMM, no TF32; bf16 weights: bf16 tensor-core GEMMs with fp32
// accumulation, the f32 activations split into two bf16 parts, hi + lo, and multiplied as two GEMMs,
// so they keep 16 bits of mantissa: a single bf16 rounding of the activations moved tiny random
// models' logits by up to 15% of their RMS on the H200), else a tiled fp32 kernel of this library
// (ModelOptions::gemm).
//
// Mixture-of-experts layers (config.moe) run on the device too: the router through the GEMM above, the
// routing, grouping and experts through moe.cu (the experts' products always with the library's own
// grouped kernels, f32 or bf16 weights as the rest).
//
// Layouts and state layout are the CPU runner's. Pointers named "device" are device memory; host
// arrays are marked as such. All calls run on the runner's own stream and return when the results
// are on the device (they synchronise the stream), so the caller may read them at once.
//
// Decode and CUDA graphs: step() for a given batch size captures the whole step (embedding, every
// layer, final norm and lm_head: ~10 kernels a layer) into a CUDA graph on first use and replays it
// on later calls, which removes the per-kernel launch cost from the CPU side. A graph is bound to the
// state and logits pointers it was captured with; a call with other pointers recaptures it.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>

#include "cuda_kernels.h"
#include "model/mamba_model.h"

namespace mssm::cuda {

enum class WeightDType : int32_t { bf16 = 0, f32 = 1 };
enum class GemmBackend : int32_t {
  automatic = 0,  // cuBLAS for M >= 32 when built with it, else the library's own kernels
  builtin = 1,    // the library's own kernels only
  cublas = 2,     // cuBLAS for M >= 32 (an error at creation when the build has no cuBLAS)
};

struct ModelOptions {
  WeightDType weights = WeightDType::bf16;
  GemmBackend gemm = GemmBackend::automatic;
  SsdMath ssd_math = SsdMath::bf16_tensor;  // Mamba-2 chunked prefill (cuda_kernels.h)
  bool use_graphs = true;                   // capture decode steps in CUDA graphs
  int device = 0;
};

// True when this build links cuBLAS.
bool have_cublas();

// One prefill over several sequences (model::ForwardArgs, with device outputs).
struct ForwardArgs {
  const int32_t* ids = nullptr;      // host [Σ lengths], checked to lie in [0, vocab)
  const int64_t* lengths = nullptr;  // host [sequences], each >= 1
  int64_t sequences = 0;
  bool last_only = false;
  float* logits = nullptr;           // device: [sequences, vocab] | [Σ lengths, vocab] | [sequences, P, vocab]
  int64_t padded_length = 0;
  float* conv_state = nullptr;       // device, the CPU runner's layout with batch = sequences; may be null
  float* ssm_state = nullptr;        // device; may be null
  bool use_initial_state = false;
  int64_t segment_tokens = 0;        // 0: 4096 tokens per pass through the layers
};

// One decode step: one token for each of `batch` sequences.
struct StepArgs {
  const int32_t* ids = nullptr;  // host [batch], checked
  int64_t batch = 0;
  float* conv_state = nullptr;   // device [layers][batch][K-1][conv channels], updated in place
  float* ssm_state = nullptr;    // device [layers][batch][...], updated in place
  float* logits = nullptr;       // device [batch, vocab]
  // false: return once the step is enqueued, without waiting for it (benchmarks, or a GPU-side loop);
  // the caller must then synchronise stream() before the next step() or before reading the results.
  bool synchronize = true;
};

class CudaModel {
 public:
  // Checks the device, the configuration and every weight, and uploads the weights. On failure
  // *out is left null and the Status says why (no device or driver, a bad weight, out of memory).
  static Status create(const model::Config& config, const std::unordered_map<std::string, model::Weight>& weights,
                       const ModelOptions& options, std::unique_ptr<CudaModel>* out);
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  const model::Config& config() const { return config_; }
  const ModelOptions& options() const { return options_; }
  cudaStream_t stream() const { return stream_; }
  // Bytes of weights on the device (what one decode step reads at least once).
  int64_t weight_bytes() const { return weight_bytes_; }
  bool uses_cublas() const;

  // Not safe to call concurrently on one CudaModel (one stream, one scratch).
  Status forward(const ForwardArgs& args);
  Status step(const StepArgs& args);
  // Turn graph use on or off (benchmarks); graphs already made are kept.
  void set_use_graphs(bool on) { options_.use_graphs = on; }

  // The states cover the Mamba layers only (state_layers(): mixture-of-experts blocks keep none).
  int64_t conv_state_floats(int64_t batch) const { return config_.state_layers() * batch * config_.conv_state_floats(); }
  int64_t ssm_state_floats(int64_t batch) const { return config_.state_layers() * batch * config_.ssm_state_floats(); }

  struct Impl;

 private:
  CudaModel() = default;
  model::Config config_;
  ModelOptions options_;
  cudaStream_t stream_ = nullptr;
  int64_t weight_bytes_ = 0;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mssm::cuda
