// The library's own GEMM kernels, y[M,N] (row stride ldy) = x[M,K] (row stride ldx) · W[N,K]ᵀ (+ bias),
// W in f32 or bf16, fp32 accumulation: used by the model runner where cuBLAS is absent or the rows are
// few, and by the mixture-of-experts block for its grouped expert products.
//
// Grouped form (GemmGroups with offsets): blockIdx.z is a group e (an expert) whose rows are
// [offsets[e], offsets[e + 1]) of x and y, read on the device, so the row counts never come back to
// the host (the call can be captured in a CUDA graph). Group e multiplies by W + e·w_stride elements
// and adds bias + e·bias_stride. M then sizes the grid (and picks the kernel): the rows a group is
// expected to have at most; every group's rows are done whatever their number.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_common.cuh"

namespace mssm::cuda::detail {

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

struct GemmGroups {
  const int64_t* offsets = nullptr;  // device [groups + 1]; null: one plain product
  int64_t w_stride = 0;              // elements of W between groups
  int64_t bias_stride = 0;           // floats of bias between groups
};

// Moves x, W, bias and y to this block's group and sets M to its rows (no-op without groups).
// (XP and WP: the kernels' pointer types, __restrict__ included.)
template <typename XP, typename WP>
__device__ __forceinline__ void enter_group(const GemmGroups& g, XP& x, int64_t ldx, WP& W, const float*& bias,
                                            float*& y, int64_t ldy, int64_t& M) {
  if (!g.offsets) return;
  const int64_t e = blockIdx.z, first = g.offsets[e];
  M = g.offsets[e + 1] - first;
  x += first * ldx;
  y += first * ldy;
  W += e * g.w_stride;
  if (bias) bias += e * g.bias_stride;
}

// Few rows (decode): one warp per output feature n streams W's row n once (16-byte loads when aligned)
// and keeps up to kRowTile row sums in registers; more rows loop over row tiles (W's row then comes
// from L1/L2).
constexpr int kSkinnyWarps = 8, kRowTile = 8;

template <typename T, bool kVector>
__global__ void __launch_bounds__(32 * kSkinnyWarps)
    gemm_skinny_kernel(const float* __restrict__ x, int64_t ldx, const T* __restrict__ W, const float* bias,
                       float* y, int64_t ldy, int64_t M, int64_t N, int64_t K, GemmGroups groups) {
  enter_group(groups, x, ldx, W, bias, y, ldy, M);
  const int lane = threadIdx.x % 32;
  const int64_t n = (int64_t)blockIdx.x * kSkinnyWarps + threadIdx.x / 32;
  if (n >= N) return;
  const T* w = W + n * K;
  constexpr int V = 16 / sizeof(T);  // elements of one 16-byte load
  for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
    float acc[kRowTile];
#pragma unroll
    for (int j = 0; j < kRowTile; ++j) acc[j] = 0.0f;
    if (kVector) {
      for (int64_t k = (int64_t)lane * V; k < K; k += 32 * V) {
        float wv[V];
        if constexpr (sizeof(T) == 2) {
          const uint4 raw = *reinterpret_cast<const uint4*>(w + k);
          const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
          for (int e = 0; e < V; ++e) wv[e] = __bfloat162float(h[e]);
        } else {
          const float4 raw = *reinterpret_cast<const float4*>(w + k);
          wv[0] = raw.x, wv[1] = raw.y, wv[2] = raw.z, wv[3] = raw.w;
        }
#pragma unroll
        for (int j = 0; j < kRowTile; ++j) {
          if (m0 + j < M) {
            const float* xr = x + (m0 + j) * ldx + k;
#pragma unroll
            for (int e = 0; e < V; e += 4) {
              const float4 xv = *reinterpret_cast<const float4*>(xr + e);
              acc[j] = fmaf(wv[e], xv.x, acc[j]);
              acc[j] = fmaf(wv[e + 1], xv.y, acc[j]);
              acc[j] = fmaf(wv[e + 2], xv.z, acc[j]);
              acc[j] = fmaf(wv[e + 3], xv.w, acc[j]);
            }
          }
        }
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) {
        const float wv = to_f32(w[k]);
#pragma unroll
        for (int j = 0; j < kRowTile; ++j)
          if (m0 + j < M) acc[j] = fmaf(wv, x[(m0 + j) * ldx + k], acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kRowTile; ++j) {
      float v = acc[j];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0 && m0 + j < M) y[(m0 + j) * ldy + n] = v + (bias ? bias[n] : 0.0f);
    }
  }
}

// Many rows: 64×64 output tiles, 16-deep K steps through shared memory, 256 threads each owning a
// 4×4 block of outputs (rows ty + 16i, columns tx + 16j).
constexpr int kTile = 64, kTileK = 16;

template <typename T>
__global__ void __launch_bounds__(256)
    gemm_tiled_kernel(const float* __restrict__ x, int64_t ldx, const T* __restrict__ W, const float* bias, float* y,
                      int64_t ldy, int64_t M, int64_t N, int64_t K, GemmGroups groups) {
  enter_group(groups, x, ldx, W, bias, y, ldy, M);
  __shared__ float xs[kTileK][kTile + 4];
  __shared__ float ws[kTileK][kTile + 4];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t n0 = (int64_t)blockIdx.x * kTile;
  // Row tiles strided by the grid: a group may hold more rows than the grid was sized for (M is read
  // on the device), or fewer (the loop then does not run; M is uniform over the block).
  for (int64_t m0 = (int64_t)blockIdx.y * kTile; m0 < M; m0 += (int64_t)gridDim.y * kTile) {
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int idx = tid + i * 256, r = idx / kTileK, kk = idx % kTileK;
        const int64_t k = k0 + kk;
        const int64_t m = m0 + r, n = n0 + r;
        xs[kk][r] = (m < M && k < K) ? x[m * ldx + k] : 0.0f;
        ws[kk][r] = (n < N && k < K) ? to_f32(W[n * K + k]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTileK; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + 16 * i], b[i] = ws[kk][tx + 16 * i];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + ty + 16 * i;
      if (m >= M) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + tx + 16 * j;
        if (n < N) y[m * ldy + n] = acc[i][j] + (bias ? bias[n] : 0.0f);
      }
    }
  }
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
