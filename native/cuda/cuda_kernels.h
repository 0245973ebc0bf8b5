// The CUDA kernels of the Mamba family: the same ops and semantics as the CPU kernels (cpu/kernels.h),
// on device memory, enqueued on a caller's stream.
//
// Every pointer is a device pointer; tensors are contiguous, row-major, fp32, in exactly the layouts
// kernels.h documents (the argument structs are shared: SelectiveScanArgs and SsdArgs hold device
// pointers here). Every function is asynchronous on `stream`; it returns a Status whose message is
// empty on success, else names the op and the cause (a bad argument, or the CUDA error of a launch).
// Errors of the kernels themselves surface at the next synchronisation, as with any CUDA call.
//
// Sizes (as kernels.h): batch, length L, channels D (d_inner), state N, groups G, heads H, head_dim P.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "cpu/kernels.h"
#include "train/ops.h"
#include "train/ssd_chunked.h"

namespace mssm::cuda {

struct Status {
  std::string message;  // empty: success
  bool ok() const { return message.empty(); }
};

// ---- Mamba-1 ------------------------------------------------------------------------------------
// The selective scan over whole sequences (cpu::KernelTable::selective_scan). Any N, any G dividing D.
Status selective_scan(const cpu::SelectiveScanArgs& args, cudaStream_t stream);
// One token per sequence (length must be 1, state_out set; usually state_out == state_in).
Status selective_state_update(const cpu::SelectiveScanArgs& args, cudaStream_t stream);

// Causal depthwise conv over time, channels last (cpu::KernelTable::conv1d). state_out may alias
// state_in; y must not alias x.
Status conv1d(const float* x, const float* w, const float* bias, const float* state_in, float* state_out, float* y,
              int64_t batch, int64_t length, int64_t channels, int64_t kernel, bool silu, cudaStream_t stream);
// One token: x [batch, channels]; state [batch, K-1, channels] updated in place.
Status conv1d_step(const float* x, const float* w, const float* bias, float* state, float* y, int64_t batch,
                   int64_t channels, int64_t kernel, bool silu, cudaStream_t stream);

// ---- Mamba-2 ------------------------------------------------------------------------------------
// How the chunked SSD does its matmuls: fp32 on the CUDA cores, or on the bf16 tensor cores with fp32
// accumulation, each fp32 operand split into two bf16 parts (hi + lo, 16 bits of mantissa) and each
// product done as hi·hi + hi·lo + lo·hi. Max error near 1e-4 of the output's scale instead of 1e-6;
// one plain bf16 rounding of the operands would give several 1e-2 (see ssd.cu).
enum class SsdMath : int32_t { fp32 = 0, bf16_tensor = 1 };

// Device scratch the chunked SSD needs for these args (bytes).
size_t ssd_chunked_workspace_bytes(const cpu::SsdArgs& args);
// The chunked SSD (cpu::KernelTable::ssd_chunked). The chunk length on the GPU is chosen to fit shared
// memory (64 tokens, less for very large N·P); args.chunk_size does not change the result and is
// ignored. workspace: at least ssd_chunked_workspace_bytes(args) bytes of device memory, or null to
// allocate it stream-ordered (cudaMallocAsync) for this call.
Status ssd_chunked(const cpu::SsdArgs& args, SsdMath math, void* workspace, cudaStream_t stream);
// One token (length must be 1, state_out set).
Status ssd_step(const cpu::SsdArgs& args, cudaStream_t stream);

// ---- Mixture of experts -------------------------------------------------------------------------
// cpu::KernelTable::moe_route without the counts: logits [tokens, experts] → weights and indices
// [tokens, top_k] (device memory; one thread per token, so experts in the tens, not thousands).
Status moe_route(const float* logits, int64_t tokens, int64_t experts, int64_t top_k, cpu::MoeScoring scoring,
                 bool renormalize, float* weights, int32_t* indices, cudaStream_t stream);
// Device scratch moe_experts needs (bytes).
size_t moe_experts_workspace_bytes(int64_t tokens, int64_t top_k, int64_t dim, int64_t hidden, int64_t experts);
// cpu::KernelTable::moe_experts on the device: every pointer of args device memory, fc1 and fc2 f32 or
// bf16, at most 65535 experts. Grouping, products and combine stay in stream order (no host sync).
Status moe_experts(const cpu::MoeExpertsArgs& args, void* workspace, cudaStream_t stream);

// ---- Training: the selective scan with recomputation (native/train/ops.h, T = float) -------------
// The forward: y and the state at the start of each chunk of args.chunk tokens, boundary [batch]
// [⌈length/chunk⌉][channels][state]. The backward: the gradients of ScanGrads (du, ddelta, dB, dC, dz
// overwritten; dA, dD, ddelta_bias accumulated into), recomputing each chunk's states from boundary.
// Every pointer device memory; state ≤ 256. dB, dC, dA, dD and ddelta_bias are sums of atomic
// additions (their rounding order varies from run to run). The backward's workspace holds one chunk's
// recomputed states for every (sequence, channel): batch · channels · min(chunk, length) · state floats,
// so it grows with the chunk, not with the length.
Status scan_train_forward(const train::ScanArgs& args, const train::ScanTensors<float>& t, float* y, float* boundary,
                          cudaStream_t stream);
size_t scan_train_backward_workspace_bytes(const train::ScanArgs& args);
Status scan_train_backward(const train::ScanArgs& args, const train::ScanTensors<float>& t, const float* boundary,
                           const float* dy, const train::ScanGrads<float>& grads, void* workspace, cudaStream_t stream);
// Mamba-2's scan for training (native/train/ssd_chunked.h, T = float), in the SSD's layout (per-head
// dt, A, D, dt_bias); boundary as ssd_chunked.h's. The forward is the recurrent form.
Status ssd_train_forward(const train::SsdTrainArgs& args, const train::SsdTrainTensors<float>& t, float* y,
                         float* boundary, cudaStream_t stream);
// The backward's two forms:
// - chunked: the matrix form of the CPU trainer (ssd_backward_block.h), one block per (sequence, head,
//   chunk), its products on the tensor cores (SsdMath::bf16_tensor, split bf16) or in fp32. It needs the
//   chunk's tiles in shared memory: chunk and head_dim up to 64 on an sm_80 or sm_90 device, for
//   example (at least 135,552 bytes with split bf16 tiles and 123,008 with fp32 ones for those, so not
//   on sm_86 or sm_89). Its workspace holds one
//   [head_dim, state] adjoint per (sequence, head, chunk), as many values as the boundary states, so
//   it grows with the length.
// - recurrent: token by token, one warp per (sequence, channel), ddt summed atomically over each head's
//   channels; any chunk. Its workspace grows with the chunk, not the length.
// Both take state ≤ 256. automatic takes the chunked form wherever its tiles fit, else the recurrent
// one. dB, dC, dA, dD and dt_bias are sums of atomic additions in both.
enum class SsdBackwardForm : int32_t { automatic = 0, chunked = 1, recurrent = 2 };
// Bytes of device workspace the backward needs with `form` (automatic: enough for either form). Size
// it for the form the call will use: a recurrent-sized workspace is too small for the chunked form.
// Device memory from cudaMalloc (256-byte aligned) is what the layouts assume.
size_t ssd_train_backward_workspace_bytes(const train::SsdTrainArgs& args,
                                          SsdBackwardForm form = SsdBackwardForm::automatic);
// The form `automatic` picks for these args on the current device with `math`.
SsdBackwardForm ssd_train_backward_form(const train::SsdTrainArgs& args, SsdMath math = SsdMath::bf16_tensor);
Status ssd_train_backward(const train::SsdTrainArgs& args, const train::SsdTrainTensors<float>& t, const float* boundary,
                          const float* dy, const train::SsdTrainGrads<float>& grads, void* workspace,
                          cudaStream_t stream, SsdBackwardForm form = SsdBackwardForm::automatic,
                          SsdMath math = SsdMath::bf16_tensor);

// ---- Sampling -----------------------------------------------------------------------------------
// cpu::KernelTable::argmax: out[r] = the index of row r's largest logit (ties: lowest; NaN never wins).
Status argmax(const float* logits, int64_t rows, int64_t vocab, int32_t* out, cudaStream_t stream);
// cpu::KernelTable::sample for each of `rows` rows of logits [rows, vocab], with the same params: u[r]
// is row r's uniform draw (cpu::sampling_draw, made on the host); params.penalty_tokens is device
// memory [rows][penalty_count] (negative entries are skipped). All pointers device memory; workspace:
// sample_workspace_bytes(rows, vocab).
size_t sample_workspace_bytes(int64_t rows, int64_t vocab);
Status sample(const float* logits, int64_t rows, int64_t vocab, const cpu::SamplingParams& params, const float* u,
              int32_t* out, void* workspace, cudaStream_t stream);

// ---- Norms --------------------------------------------------------------------------------------
// cpu::KernelTable::rmsnorm: out = rmsnorm(x (+ residual)) · weight; residual_out gets x + residual.
// out and residual_out may alias x or residual.
Status rmsnorm(const float* x, const float* residual, const float* weight, float* out, float* residual_out,
               int64_t rows, int64_t dim, float eps, cudaStream_t stream);
// cpu::KernelTable::gated_rmsnorm over groups of group_size; z may be null; out may alias x or z.
Status gated_rmsnorm(const float* x, const float* z, const float* weight, float* out, int64_t rows, int64_t dim,
                     int64_t group_size, float eps, bool norm_before_gate, cudaStream_t stream);

}  // namespace mssm::cuda
