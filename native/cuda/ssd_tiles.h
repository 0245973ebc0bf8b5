// Block-wide tile helpers of the chunked SSD kernels (ssd.cu's forward, ssd_train.cu's backward):
// operand tiles staged in shared memory as fp32 or as split bf16, the block's products over them, and
// the staging loop.
//
// The header also compiles without nvcc (T = float, or HostBf16 below), on block.h's primitives: each
// helper then runs as one host thread that does all the block's work in order, with the barriers
// empty, unless the caller has given the thread a place in an emulated block. MSSM_STRIDE is the
// block's thread count (kThreads under nvcc). The training backward's per-block bodies
// (ssd_backward_block.h) are written on these helpers, so a CPU test runs the very same code, block by
// block, against the CPU trainer (native/tests/test_ssd_backward_blocks.cpp).
//
// Precision of the tensor-core path ("split bf16", also called bf16x3): every operand tile is held as
// two bf16 planes, hi = bf16(v) and lo = bf16(v - hi), so hi + lo carries 16 bits of v's mantissa,
// and each product is hi·hi + hi·lo + lo·hi (lo·lo, 2^-16 relative, is dropped), accumulated in fp32.
#pragma once
#include <cstddef>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "block.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <mma.h>
#define MSSM_STRIDE ::mssm::cuda::tiles::kThreads
#else
#define MSSM_STRIDE (::mssm::cuda::block::host::lane().stride)
#endif
namespace mssm::cuda::tiles {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBatch = 8;  // loads in flight per thread in the staging loops

MSSM_HD constexpr int round16(int64_t v) { return (int)((v + 15) / 16 * 16); }
MSSM_HD constexpr size_t align128(size_t v) { return (v + 127) / 128 * 128; }

// Leading dimensions of shared tiles: odd for fp32 (the dot-product loops read columns without bank
// conflicts), a multiple of 8 elements for bf16 (wmma needs 16-byte multiples).
template <typename T>
MSSM_HD constexpr int lead(int cols) {
  return sizeof(T) == 4 ? cols + 1 : cols + 8;
}
// fp32 results of the products (wmma stores them: a multiple of 4 floats).
MSSM_HD constexpr int lead_f32(int cols) { return cols + 4; }

// Planes of an operand tile: fp32 one; split bf16 two (hi, then lo at `plane` elements further).
template <typename T>
MSSM_HD constexpr int planes() {
  return sizeof(T) == 4 ? 1 : 2;
}
// Elements of one plane of a tile of `rows` rows with leading dimension ld.
MSSM_HD constexpr int plane_size(int rows, int ld) { return rows * ld; }

// Bytes of an operand tile of rows × cols (planes<T>() planes of rows × lead<T>(cols) elements).
template <typename T>
MSSM_HD size_t tile_bytes(int rows, int cols) {
  return sizeof(T) * planes<T>() * (size_t)rows * lead<T>(cols);
}

#ifndef __CUDACC__
// Without nvcc, the split bf16 tiles are emulated with block::HostBf16, and block_matmul forms the same
// three products in fp32 (in another summation order than the tensor cores').
using block::HostBf16;
using block::to_bf16;
using block::to_float;
#endif

// tile[i] = v: fp32 as is; split bf16 as hi at tile[i] and lo = bf16(v - hi) at tile[i + plane].
MSSM_BLOCK_FN void put(float* tile, int /*plane*/, int i, float v) { tile[i] = v; }
#ifdef __CUDACC__
MSSM_BLOCK_FN void put(__nv_bfloat16* tile, int plane, int i, float v) {
  const __nv_bfloat16 hi = __float2bfloat16_rn(v);
  tile[i] = hi;
  tile[i + plane] = __float2bfloat16_rn(v - __bfloat162float(hi));
}
#else
inline void put(HostBf16* tile, int plane, int i, float v) {
  const HostBf16 hi = to_bf16(v);
  tile[i] = hi;
  tile[i + plane] = to_bf16(v - to_float(hi));
}
#endif

// For e in [0, count), spread over the block: store(e, load(e)), with kBatch loads issued before the
// first store (load(e) must be safe for every e < count).
template <typename Load, typename Store>
MSSM_BLOCK_FN void staged(int count, Load load, Store store) {
  for (int e0 = MSSM_RANK; e0 < count; e0 += MSSM_STRIDE * kBatch) {
    float v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = e0 + u * MSSM_STRIDE;
      v[u] = e < count ? load(e) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = e0 + u * MSSM_STRIDE;
      if (e < count) store(e, v[u]);
    }
  }
}

// An operand tile of rows × cols (leading dimension ld, lo plane `plane` further) from rows of a
// global tensor: tile[r][n] = scale(r)·src[r·stride + n0 + n] for r < valid_rows and n0 + n < valid_cols,
// else 0.
template <typename T, typename Scale>
MSSM_BLOCK_FN void stage_tile(T* tile, int plane, int ld, int rows, int cols, const float* src, int64_t stride,
                             int valid_rows, int64_t valid_cols, int n0, Scale scale) {
  staged(
      rows * cols,
      [&](int e) {
        const int r = e / cols, n = n0 + e % cols;
        return r < valid_rows && n < valid_cols ? src[r * stride + n] : 0.0f;
      },
      [&](int e, float v) { put(tile, plane, (e / cols) * ld + e % cols, scale(e / cols) * v); });
}
struct Unscaled {
  MSSM_HD float operator()(int) const { return 1.0f; }
};

// out[i·ldo + j] (+)= Σ_k A(i,k)·B(k,j) over i < M, j < Nc, k < K, all multiples of 16, by the whole
// block. A(i,k) is A[i·lda + k] (row-major) or A[k·lda + i] (ACol); B(k,j) is B[k·ldb + j] or
// B[j·ldb + k] (BCol). Split bf16: the lo planes are pa and pb elements further. Ends with a barrier.
template <typename T, bool ACol, bool BCol>
MSSM_BLOCK_FN void block_matmul(float* out, int ldo, const T* A, int lda, int pa, const T* B, int ldb, int pb, int M,
                               int Nc, int K, bool accumulate) {
  if constexpr (sizeof(T) == 4) {
    for (int e = MSSM_RANK; e < M * Nc; e += MSSM_STRIDE) {
      const int i = e / Nc, j = e % Nc;
      float acc = accumulate ? out[i * ldo + j] : 0.0f;
      for (int k = 0; k < K; ++k) {
        const float a = ACol ? A[k * lda + i] : A[i * lda + k];
        const float b = BCol ? B[j * ldb + k] : B[k * ldb + j];
        acc = fmaf(a, b, acc);
      }
      out[i * ldo + j] = acc;
    }
  } else {
#ifdef __CUDACC__
    namespace wmma = nvcuda::wmma;
    using ALayout = std::conditional_t<ACol, wmma::col_major, wmma::row_major>;
    using BLayout = std::conditional_t<BCol, wmma::col_major, wmma::row_major>;
    const int tiles_n = Nc / 16, tiles = (M / 16) * tiles_n;
    for (int tile = block::warp_id(); tile < tiles; tile += kWarps) {
      const int ti = tile / tiles_n, tj = tile % tiles_n;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      float* o = out + ti * 16 * ldo + tj * 16;
      if (accumulate)
        wmma::load_matrix_sync(acc, o, ldo, wmma::mem_row_major);
      else
        wmma::fill_fragment(acc, 0.0f);
      for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, ALayout> a_hi, a_lo;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, BLayout> b_hi, b_lo;
        const T* at = ACol ? A + k0 * lda + ti * 16 : A + ti * 16 * lda + k0;
        const T* bt = BCol ? B + tj * 16 * ldb + k0 : B + k0 * ldb + tj * 16;
        wmma::load_matrix_sync(a_hi, at, lda);
        wmma::load_matrix_sync(a_lo, at + pa, lda);
        wmma::load_matrix_sync(b_hi, bt, ldb);
        wmma::load_matrix_sync(b_lo, bt + pb, ldb);
        // The small terms first, then the large one.
        wmma::mma_sync(acc, a_lo, b_hi, acc);
        wmma::mma_sync(acc, a_hi, b_lo, acc);
        wmma::mma_sync(acc, a_hi, b_hi, acc);
      }
      wmma::store_matrix_sync(o, acc, ldo, wmma::mem_row_major);
    }
#else
    for (int e = MSSM_RANK; e < M * Nc; e += MSSM_STRIDE) {
      const int i = e / Nc, j = e % Nc;
      float acc = accumulate ? out[i * ldo + j] : 0.0f;
      for (int k = 0; k < K; ++k) {
        const int ai = ACol ? k * lda + i : i * lda + k, bi = BCol ? j * ldb + k : k * ldb + j;
        const float a_hi = to_float(A[ai]), a_lo = to_float(A[ai + pa]);
        const float b_hi = to_float(B[bi]), b_lo = to_float(B[bi + pb]);
        acc = fmaf(a_lo, b_hi, acc);
        acc = fmaf(a_hi, b_lo, acc);
        acc = fmaf(a_hi, b_hi, acc);
      }
      out[i * ldo + j] = acc;
    }
#endif
  }
  MSSM_SYNC();
}

}  // namespace mssm::cuda::tiles
