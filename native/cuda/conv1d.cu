// Causal depthwise conv1d over time, channels last, with its one-token decode form.
//
// Glossary: b batch, t token (L = length), c channel (C = channels), k tap (K = kernel).
//   xp[b] = concat(state_in[b], x[b]) over time  (K-1 + L rows; a null state_in gives zero rows)
//   y[b,t,c] = act(bias[c] + Σ_k w[c,k]·xp[b, t+k, c])        act = SiLU or identity
//   state_out[b] = the last K-1 rows of xp[b]
// One thread per output element, c fastest so that a warp reads whole rows; the K taps of a thread
// are the rows that neighbouring tokens' threads read too, so they mostly come from L1/L2.
#include <cuda_runtime.h>

#include "cuda_common.cuh"

namespace mssm::cuda {
namespace {

using detail::ceil_div;

// Row r of xp for batch b and channel c.
__device__ __forceinline__ float xp_at(const float* x, const float* state_in, int64_t b, int64_t r, int64_t c,
                                       int64_t L, int64_t C, int64_t history) {
  if (r < history) return state_in ? state_in[(b * history + r) * C + c] : 0.0f;
  return x[(b * L + r - history) * C + c];
}

__global__ void conv1d_kernel(const float* x, const float* w, const float* bias, const float* state_in, float* y,
                              int64_t batch, int64_t L, int64_t C, int64_t K, bool silu) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;  // (b·L + t)·C + c
  if (i >= batch * L * C) return;
  const int64_t c = i % C, t = i / C % L, b = i / (C * L);
  float acc = bias ? bias[c] : 0.0f;
  for (int64_t k = 0; k < K; ++k) acc = fmaf(w[c * K + k], xp_at(x, state_in, b, t + k, c, L, C, K - 1), acc);
  y[i] = silu ? detail::silu(acc) : acc;
}

// One thread per (b, c) walks the K-1 state rows in increasing order: row j reads xp row L+j ≥ j, so
// when state_out aliases state_in no row is overwritten before it is read, and no other thread
// touches this column.
__global__ void conv1d_state_kernel(const float* x, const float* state_in, float* state_out, int64_t batch,
                                    int64_t L, int64_t C, int64_t history) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;  // b·C + c
  if (i >= batch * C) return;
  const int64_t c = i % C, b = i / C;
  for (int64_t j = 0; j < history; ++j)
    state_out[(b * history + j) * C + c] = xp_at(x, state_in, b, L + j, c, L, C, history);
}

// One token per thread (b, c); state rows shift down by one and x enters last.
__global__ void conv1d_step_kernel(const float* x, const float* w, const float* bias, float* state, float* y,
                                   int64_t batch, int64_t C, int64_t K, bool silu) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;  // b·C + c
  if (i >= batch * C) return;
  const int64_t c = i % C, b = i / C, history = K - 1;
  float* rows = state + b * history * C + c;
  const float xv = x[i];
  float acc = bias ? bias[c] : 0.0f;
  for (int64_t k = 0; k < history; ++k) acc = fmaf(w[c * K + k], rows[k * C], acc);
  acc = fmaf(w[c * K + history], xv, acc);
  y[i] = silu ? detail::silu(acc) : acc;
  for (int64_t k = 0; k + 1 < history; ++k) rows[k * C] = rows[(k + 1) * C];
  if (history > 0) rows[(history - 1) * C] = xv;
}

constexpr int kThreads = 256;

}  // namespace

Status conv1d(const float* x, const float* w, const float* bias, const float* state_in, float* state_out, float* y,
              int64_t batch, int64_t length, int64_t channels, int64_t kernel, bool silu, cudaStream_t stream) {
  const char* op = "conv1d";
  if (batch < 0 || length < 0 || channels < 0 || kernel < 1) return detail::error(op, "bad sizes (kernel must be ≥ 1)");
  if (batch * length * channels > 0 && (!x || !w || !y)) return detail::error(op, "x, w and y must be set");
  if (x && x == y) return detail::error(op, "y must not alias x");
  const int64_t outputs = batch * length * channels;
  if (outputs > 0) {
    conv1d_kernel<<<(unsigned)ceil_div(outputs, kThreads), kThreads, 0, stream>>>(x, w, bias, state_in, y, batch, length,
                                                                                    channels, kernel, silu);
    MSSM_STATUS_TRY(detail::check_launch(op));
  }
  if (state_out && kernel > 1 && batch * channels > 0) {
    // Enqueued after the y kernel: state_out may alias the state_in that kernel reads.
    conv1d_state_kernel<<<(unsigned)ceil_div(batch * channels, kThreads), kThreads, 0, stream>>>(
        x, state_in, state_out, batch, length, channels, kernel - 1);
    MSSM_STATUS_TRY(detail::check_launch(op));
  }
  return {};
}

Status conv1d_step(const float* x, const float* w, const float* bias, float* state, float* y, int64_t batch,
                   int64_t channels, int64_t kernel, bool silu, cudaStream_t stream) {
  const char* op = "conv1d_step";
  if (batch < 0 || channels < 0 || kernel < 1) return detail::error(op, "bad sizes (kernel must be ≥ 1)");
  if (batch * channels == 0) return {};
  if (!x || !w || !y || (kernel > 1 && !state)) return detail::error(op, "x, w, state and y must be set");
  conv1d_step_kernel<<<(unsigned)ceil_div(batch * channels, kThreads), kThreads, 0, stream>>>(x, w, bias, state, y,
                                                                                            batch, channels, kernel, silu);
  return detail::check_launch(op);
}

}  // namespace mssm::cuda
