// The blocks of gemm.cuh's kernels, y[M,N] (row stride ldy) = x[M,K] (row stride ldx) · W[N,K]ᵀ
// (+ bias), W in f32 or bf16, fp32 accumulation, as block code on native/cuda/block.h's primitives so
// that they also compile without nvcc: a CPU test runs them on emulated blocks against a naive
// product (native/tests/test_gemm_blocks.cpp), W as float or block::HostBf16.
//
// Grouped form (GemmGroups with offsets): block z is a group e (an expert) whose rows are
// [offsets[e], offsets[e + 1]) of x and y, read on the device, so the row counts never come back to
// the host (the call can be captured in a CUDA graph). Group e multiplies by W + e·w_stride elements
// and adds bias + e·bias_stride. M then sizes the grid (and picks the kernel): the rows a group is
// expected to have at most; every group's rows are done whatever their number.
#pragma once
#include <cstdint>

#include "block.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#endif

namespace mssm::cuda::gemm {

MSSM_BLOCK_FN float to_f32(float v) { return v; }
#ifdef __CUDACC__
MSSM_BLOCK_FN float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
#else
inline float to_f32(block::HostBf16 v) { return block::to_float(v); }
#endif

struct GemmGroups {
  const int64_t* offsets = nullptr;  // [groups + 1]; null: one plain product
  int64_t w_stride = 0;              // elements of W between groups
  int64_t bias_stride = 0;           // floats of bias between groups
};

// Moves x, W, bias and y to group e and sets M to its rows (no-op without groups).
template <typename XP, typename WP>
MSSM_BLOCK_FN void enter_group(const GemmGroups& g, int64_t e, XP& x, int64_t ldx, WP& W, const float*& bias,
                               float*& y, int64_t ldy, int64_t& M) {
  if (!g.offsets) return;
  const int64_t first = g.offsets[e];
  M = g.offsets[e + 1] - first;
  x += first * ldx;
  y += first * ldy;
  W += e * g.w_stride;
  if (bias) bias += e * g.bias_stride;
}

// 16 bytes of W (4 floats or 8 bf16) and 4 floats of x as floats: one vector load each on the device.
template <typename T>
MSSM_BLOCK_FN void load16(const T* p, float* out) {
#ifdef __CUDACC__
  if constexpr (sizeof(T) == 2) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = __bfloat162float(h[e]);
  } else {
    const float4 raw = *reinterpret_cast<const float4*>(p);
    out[0] = raw.x, out[1] = raw.y, out[2] = raw.z, out[3] = raw.w;
  }
#else
  for (int e = 0; e < 16 / (int)sizeof(T); ++e) out[e] = to_f32(p[e]);
#endif
}
MSSM_BLOCK_FN void load4(const float* p, float* out) {
#ifdef __CUDACC__
  const float4 raw = *reinterpret_cast<const float4*>(p);
  out[0] = raw.x, out[1] = raw.y, out[2] = raw.z, out[3] = raw.w;
#else
  for (int e = 0; e < 4; ++e) out[e] = p[e];
#endif
}

// Few rows (decode): one warp per output feature n streams W's row n once (16-byte loads when aligned,
// kVector) and keeps up to kRowTile row sums in registers; more rows loop over row tiles (W's row then
// comes from L1/L2). Block (bx, bz) of kSkinnyWarps warps: features bx·kSkinnyWarps + warp of group bz.
constexpr int kSkinnyWarps = 8, kRowTile = 8;

template <typename T, bool kVector>
MSSM_BLOCK_FN void gemm_skinny_block(const float* __restrict__ x, int64_t ldx, const T* __restrict__ W, const float* bias, float* y, int64_t ldy,
                                     int64_t M, int64_t N, int64_t K, const GemmGroups& groups, int64_t bx,
                                     int64_t bz) {
  enter_group(groups, bz, x, ldx, W, bias, y, ldy, M);
  const int lane = block::lane_id();
  const int64_t n = bx * kSkinnyWarps + block::warp_id();
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
        load16(w + k, wv);
#pragma unroll
        for (int j = 0; j < kRowTile; ++j) {
          if (m0 + j < M) {
            const float* xr = x + (m0 + j) * ldx + k;
#pragma unroll
            for (int e = 0; e < V; e += 4) {
              float xv[4];
              load4(xr + e, xv);
              acc[j] = fmaf(wv[e], xv[0], acc[j]);
              acc[j] = fmaf(wv[e + 1], xv[1], acc[j]);
              acc[j] = fmaf(wv[e + 2], xv[2], acc[j]);
              acc[j] = fmaf(wv[e + 3], xv[3], acc[j]);
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
      const float v = block::warp_sum(acc[j]);
      if (lane == 0 && m0 + j < M) y[(m0 + j) * ldy + n] = v + (bias ? bias[n] : 0.0f);
    }
  }
}

// Many rows: 64×64 output tiles, 16-deep K steps through shared memory, 256 threads each owning a
// 4×4 block of outputs (rows ty + 16i, columns tx + 16j). Block (bx, by, bz) of a grid of grid_y row
// tiles: columns bx·64 of group bz, row tiles by, by + grid_y, … (a group may hold more rows than the
// grid was sized for, M being read on the device, or fewer: the loop then does not run; M is uniform
// over the block).
constexpr int kTile = 64, kTileK = 16;

template <typename T>
MSSM_BLOCK_FN void gemm_tiled_block(const float* __restrict__ x, int64_t ldx, const T* __restrict__ W, const float* bias, float* y, int64_t ldy,
                                    int64_t M, int64_t N, int64_t K, const GemmGroups& groups, int64_t bx, int64_t by,
                                    int64_t bz, int64_t grid_y) {
  enter_group(groups, bz, x, ldx, W, bias, y, ldy, M);
  MSSM_SHARED(float[kTileK][kTile + 4], xs);
  MSSM_SHARED(float[kTileK][kTile + 4], ws);
  const int tid = MSSM_RANK, tx = tid % 16, ty = tid / 16;
  const int64_t n0 = bx * kTile;
  for (int64_t m0 = by * kTile; m0 < M; m0 += grid_y * kTile) {
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
      MSSM_SYNC();
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
      MSSM_SYNC();
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

}  // namespace mssm::cuda::gemm
