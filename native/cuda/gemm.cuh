// The library's own GEMM kernels, y[M,N] (row stride ldy) = x[M,K] (row stride ldx) · W[N,K]ᵀ (+ bias),
// W in f32 or bf16, fp32 accumulation: used by the model runner where cuBLAS is absent or the rows are
// few, and by the mixture-of-experts block for its grouped expert products (GemmGroups: blockIdx.z is
// the group). The blocks' code, and what the grouped form does, is gemm_block.h's.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_common.cuh"
#include "gemm_block.h"

namespace mssm::cuda::detail {

using gemm::GemmGroups;
using gemm::kSkinnyWarps;
using gemm::kTile;
using gemm::to_f32;

template <typename T, bool kVector>
__global__ void __launch_bounds__(32 * kSkinnyWarps)
    gemm_skinny_kernel(const float* __restrict__ x, int64_t ldx, const T* __restrict__ W, const float* bias,
                       float* y, int64_t ldy, int64_t M, int64_t N, int64_t K, GemmGroups groups) {
  gemm::gemm_skinny_block<T, kVector>(x, ldx, W, bias, y, ldy, M, N, K, groups, blockIdx.x, blockIdx.z);
}

template <typename T>
__global__ void __launch_bounds__(256)
    gemm_tiled_kernel(const float* __restrict__ x, int64_t ldx, const T* __restrict__ W, const float* bias, float* y,
                      int64_t ldy, int64_t M, int64_t N, int64_t K, GemmGroups groups) {
  gemm::gemm_tiled_block<T>(x, ldx, W, bias, y, ldy, M, N, K, groups, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.y);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Rows below this go to the skinny kernel (the model runner sends them to cuBLAS from here up when it
// has it).
constexpr int64_t kSkinnyMaxRows = 32;

// Enqueues the product (see the top); `groups` products when g.offsets is set (M: the most rows of one).
inline Status builtin_gemm(const float* x, int64_t ldx, const void* W, bool bf16, const float* bias, float* y,
                           int64_t ldy, int64_t M, int64_t N, int64_t K, cudaStream_t stream,
                           const GemmGroups& g = GemmGroups{}, int64_t groups = 1) {
  const char* op = "gemm";
  if (M == 0 || N == 0 || groups == 0) return {};
  if (groups > 65535) return error(op, std::to_string(groups) + " groups exceed the grid's 65535");
  if (M < kSkinnyMaxRows) {
    const dim3 grid((unsigned)ceil_div(N, kSkinnyWarps), 1, (unsigned)groups);
    const int V = bf16 ? 8 : 4;
    // Grouped rows start at any row, so the 16-byte path also needs ldx, and W's group stride, aligned.
    const bool vec = K % V == 0 && ldx % 4 == 0 && aligned16(x) && aligned16(W) && g.w_stride % V == 0;
    if (bf16) {
      auto* w = static_cast<const __nv_bfloat16*>(W);
      if (vec)
        gemm_skinny_kernel<__nv_bfloat16, true><<<grid, 32 * kSkinnyWarps, 0, stream>>>(x, ldx, w, bias, y, ldy, M, N,
                                                                                       K, g);
      else
        gemm_skinny_kernel<__nv_bfloat16, false><<<grid, 32 * kSkinnyWarps, 0, stream>>>(x, ldx, w, bias, y, ldy, M,
                                                                                        N, K, g);
    } else {
      auto* w = static_cast<const float*>(W);
      if (vec)
        gemm_skinny_kernel<float, true><<<grid, 32 * kSkinnyWarps, 0, stream>>>(x, ldx, w, bias, y, ldy, M, N, K, g);
      else
        gemm_skinny_kernel<float, false><<<grid, 32 * kSkinnyWarps, 0, stream>>>(x, ldx, w, bias, y, ldy, M, N, K, g);
    }
    return check_launch(op);
  }
  if (ceil_div(M, kTile) > 65535) return error(op, "too many rows");
  const dim3 grid((unsigned)ceil_div(N, kTile), (unsigned)ceil_div(M, kTile), (unsigned)groups);
  if (bf16)
    gemm_tiled_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(x, ldx, static_cast<const __nv_bfloat16*>(W), bias, y,
                                                               ldy, M, N, K, g);
  else
    gemm_tiled_kernel<float><<<grid, 256, 0, stream>>>(x, ldx, static_cast<const float*>(W), bias, y, ldy, M, N, K, g);
  return check_launch(op);
}

}  // namespace mssm::cuda::detail
