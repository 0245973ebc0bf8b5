// RMSNorm with the fused residual add of a pre-norm block, and Mamba-2's grouped gated RMSNorm.
//
// Glossary: rows independent vectors (tokens), dim features per row, group_size features normalised
// together by gated_rmsnorm, s the vector normalised (x, x + residual, or x ⊙ silu(z)),
// rmsnorm(s) = s / sqrt(mean(s²) + eps).
// One block per row (or per group of a row). Each thread owns the elements i ≡ threadIdx (mod
// blockDim) in both passes, so an element is read and written by one thread only: outputs may alias
// inputs. Σ s² is summed in fp32 per thread and in double across the block.
#include <cuda_runtime.h>

#include "cuda_common.cuh"

namespace mssm::cuda {
namespace {

constexpr int kThreads = 256;

// Σ over the block of each thread's value, returned to every thread.
__device__ double block_sum(double v) {
  __shared__ double partial[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0;
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) total += partial[i];
  return total;
}

__device__ __forceinline__ float inverse_rms(double sum_squares, int64_t count, float eps) {
  return (float)(1.0 / sqrt(sum_squares / (double)count + (double)eps));
}

__global__ void __launch_bounds__(kThreads) rmsnorm_kernel(const float* x, const float* residual, const float* weight,
                                                           float* out, float* residual_out, int64_t dim, float eps) {
  const int64_t offset = (int64_t)blockIdx.x * dim;
  x += offset;
  out += offset;
  if (residual) residual += offset;
  if (residual_out) residual_out += offset;
  float squares = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    const float s = residual ? x[i] + residual[i] : x[i];
    if (residual_out) residual_out[i] = s;
    squares = fmaf(s, s, squares);
  }
  const float scale = inverse_rms(block_sum(squares), dim, eps);
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    const float s = residual_out ? residual_out[i] : residual ? x[i] + residual[i] : x[i];
    out[i] = s * scale * weight[i];
  }
}

// Block per (row, group): out = rmsnorm(x ⊙ silu(z))·w, or rmsnorm(x)·w ⊙ silu(z) when norm_before_gate.
__global__ void __launch_bounds__(kThreads) gated_rmsnorm_kernel(const float* x, const float* z, const float* weight,
                                                                 float* out, int64_t groups, int64_t group_size,
                                                                 float eps, bool norm_before_gate) {
  const int64_t offset = (int64_t)blockIdx.x * group_size;
  const float* w = weight + (blockIdx.x % groups) * group_size;
  const bool gate_first = z && !norm_before_gate;
  float squares = 0.0f;
  for (int64_t i = threadIdx.x; i < group_size; i += kThreads) {
    const float s = gate_first ? x[offset + i] * detail::silu(z[offset + i]) : x[offset + i];
    squares = fmaf(s, s, squares);
  }
  const float scale = inverse_rms(block_sum(squares), group_size, eps);
  for (int64_t i = threadIdx.x; i < group_size; i += kThreads) {
    const float xv = x[offset + i];
    const float gate = z ? detail::silu(z[offset + i]) : 1.0f;
    out[offset + i] = gate_first ? xv * gate * scale * w[i] : xv * scale * w[i] * gate;
  }
}

}  // namespace

Status rmsnorm(const float* x, const float* residual, const float* weight, float* out, float* residual_out,
               int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
  const char* op = "rmsnorm";
  if (rows < 0 || dim < 0) return detail::error(op, "negative size");
  if (rows == 0 || dim == 0) return {};
  if (!x || !weight || !out) return detail::error(op, "x, weight and out must be set");
  if (rows > 0x7fffffff) return detail::error(op, "too many rows");
  rmsnorm_kernel<<<(unsigned)rows, kThreads, 0, stream>>>(x, residual, weight, out, residual ? residual_out : nullptr,
                                                         dim, eps);
  return detail::check_launch(op);
}

Status gated_rmsnorm(const float* x, const float* z, const float* weight, float* out, int64_t rows, int64_t dim,
                     int64_t group_size, float eps, bool norm_before_gate, cudaStream_t stream) {
  const char* op = "gated_rmsnorm";
  if (rows < 0 || dim < 0) return detail::error(op, "negative size");
  if (group_size <= 0 || dim % group_size != 0)
    return detail::error(op, "group_size " + std::to_string(group_size) + " does not divide dim " + std::to_string(dim));
  if (rows == 0 || dim == 0) return {};
  if (!x || !weight || !out) return detail::error(op, "x, weight and out must be set");
  const int64_t blocks = rows * (dim / group_size);
  if (blocks > 0x7fffffff) return detail::error(op, "too many rows");
  gated_rmsnorm_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(x, z, weight, out, dim / group_size, group_size,
                                                                  eps, norm_before_gate);
  return detail::check_launch(op);
}

}  // namespace mssm::cuda
