// The prefill path of matmul: many rows of x, bound by arithmetic.
//
// Two arrangements of the same blocked product, chosen by the number of rows of x:
//  - rows (the general case): a panel of W (NC output features × KC of depth) is transposed into
//    strips of NR features, k-major, so that one k step of a strip is NR contiguous weights; a block of
//    x (MC rows × KC) is copied to rows of a fixed stride. An MR × NR tile of y stays in registers over
//    the panel's depth, each k step broadcasting MR values of x against the NR weights of the strip.
//  - columns (few rows of x, many output features): transposing W would cost as much as multiplying
//    it, so x is transposed instead (k-major, a register holds one k of kLanes rows) and W is only
//    copied, row by row, into a strip of fixed stride; each k step broadcasts single weights against
//    registers of x, and the tile of y, held column by column, is transposed when it is written.
//
// Two kinds of arithmetic run in either arrangement:
//  - f32: weights of every dtype are widened to f32 while they are packed (f16, bf16 and q8_0 exactly),
//    x stays f32, one FMA per multiply-add.
//  - bf16 × bf16 (avx512bf16 level, bf16 weights only): W keeps its bf16 values, the two weights of each
//    pair of neighbouring k sharing one 32-bit lane (as a bf16 row already stores them), and x is
//    rounded to bf16 (nearest even) when its block is packed. VDPBF16PS then does two multiply-adds per
//    lane, twice the f32 FMA rate; the products of two bf16 are exact and are accumulated in f32.
//    Rounding x to bf16 (8 significant bits: a relative error of at most 2⁻⁸ per element) is the one
//    change to the numerics: about 1.7e-3 of the output RMS for random data (test_gemm_prefill.cpp
//    bounds it), the same order as storing the weights in bf16 already costs.
//  - bf16 × bf16 from q8_0 weights (gemm_step, avx512bf16 level: the many-row products of a decode
//    step, whose few-row q8_0 products already quantise x to int8): each weight q·d is rounded to bf16
//    as it is copied or packed, then as above. Prefill keeps q8_0 products in f32.
#include "gemm_common.h"

namespace mssm::cpu::MSSM_LEVEL {
namespace gemm_detail {
namespace {

// ---- Sizes --------------------------------------------------------------------------------------
// Rows arrangement: NR = two registers of output features; MR × NV accumulators use half of AVX-512's
// 32 registers (the kernel alone runs at ~95% of the FMA peak there; 12 × 2, 14 × 2, 6 × 4 and 8 × 3
// measured no faster) and 12 and 8 of the 16 of AVX2 and SSE2.
constexpr int NV = 2;
constexpr int NR = NV * kLanes;
#if defined(__AVX512F__)
constexpr int MR = 8;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int MR = 6;
#else
constexpr int MR = 4;
#endif
constexpr int64_t MC = 24 * MR;  // rows of x per packed block (192 on AVX-512: 300 KiB, in L2)
constexpr int64_t NC = 32 * NR;  // output features per packed panel of W
// Panels start at multiples of this depth, so that a q8_0 block or a pair of bf16 never straddles two.
constexpr int64_t kDepthAlign = 32;

// K is cut into equal panels of at most max_depth (rounded up to kDepthAlign), so that no thin panel
// is left at the end.
inline int64_t panel_depth(int64_t K, int64_t max_depth) {
  const int64_t panels = (K + max_depth - 1) / max_depth;
  const int64_t depth = (K + panels - 1) / panels;
  return (depth + kDepthAlign - 1) / kDepthAlign * kDepthAlign;
}

// ---- Transposing a square block of registers ----------------------------------------------------
// out[c · stride + r] = lane c of v[r], for the kLanes × kLanes block whose row r is register v[r].
#if defined(__AVX512F__)
inline void store_transposed(const __m512* v, float* out, int64_t stride) {
  __m512 t[16], u[16];
  for (int p = 0; p < 8; ++p) {  // within each 128-bit lane: rows 2p, 2p+1 interleaved
    t[2 * p] = _mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]);
    t[2 * p + 1] = _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]);
  }
  for (int q = 0; q < 4; ++q) {  // u[4q + e], 128-bit lane L: rows 4q..4q+3 of column 4L + e
    u[4 * q] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0x44);
    u[4 * q + 1] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0xee);
    u[4 * q + 2] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44);
    u[4 * q + 3] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xee);
  }
  for (int e = 0; e < 4; ++e) {  // column 4L + e gathers lane L of u[e], u[4 + e], u[8 + e], u[12 + e]
    const __m512 even_lo = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88);
    const __m512 odd_lo = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xdd);
    const __m512 even_hi = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88);
    const __m512 odd_hi = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xdd);
    _mm512_storeu_ps(out + e * stride, _mm512_shuffle_f32x4(even_lo, even_hi, 0x88));
    _mm512_storeu_ps(out + (8 + e) * stride, _mm512_shuffle_f32x4(even_lo, even_hi, 0xdd));
    _mm512_storeu_ps(out + (4 + e) * stride, _mm512_shuffle_f32x4(odd_lo, odd_hi, 0x88));
    _mm512_storeu_ps(out + (12 + e) * stride, _mm512_shuffle_f32x4(odd_lo, odd_hi, 0xdd));
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
inline void store_transposed(const __m256* v, float* out, int64_t stride) {
  __m256 t[8], u[8];
  for (int p = 0; p < 4; ++p) {
    t[2 * p] = _mm256_unpacklo_ps(v[2 * p], v[2 * p + 1]);
    t[2 * p + 1] = _mm256_unpackhi_ps(v[2 * p], v[2 * p + 1]);
  }
  for (int q = 0; q < 2; ++q) {  // u[4q + e], 128-bit lane L: rows 4q..4q+3 of column 4L + e
    u[4 * q] = _mm256_shuffle_ps(t[4 * q], t[4 * q + 2], 0x44);
    u[4 * q + 1] = _mm256_shuffle_ps(t[4 * q], t[4 * q + 2], 0xee);
    u[4 * q + 2] = _mm256_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44);
    u[4 * q + 3] = _mm256_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xee);
  }
  for (int e = 0; e < 4; ++e) {
    _mm256_storeu_ps(out + e * stride, _mm256_permute2f128_ps(u[e], u[4 + e], 0x20));
    _mm256_storeu_ps(out + (4 + e) * stride, _mm256_permute2f128_ps(u[e], u[4 + e], 0x31));
  }
}
#elif defined(__SSE2__)
inline void store_transposed(const __m128* v, float* out, int64_t stride) {
  __m128 r0 = v[0], r1 = v[1], r2 = v[2], r3 = v[3];
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(out, r0);
  _mm_storeu_ps(out + stride, r1);
  _mm_storeu_ps(out + 2 * stride, r2);
  _mm_storeu_ps(out + 3 * stride, r3);
}
#else
inline void store_transposed(const vfloat* v, float* out, int64_t stride) {
  for (int r = 0; r < kLanes; ++r)
    for (int c = 0; c < kLanes; ++c) out[c * stride + r] = v[r].v[c];
}
#endif

#if defined(__AVX512BF16__)
// The same for 32-bit lanes holding pairs of bf16.
inline void store_transposed(const __m512i* v, uint32_t* out, int64_t stride) {
  __m512 f[16];
  for (int r = 0; r < 16; ++r) f[r] = _mm512_castsi512_ps(v[r]);
  store_transposed(f, reinterpret_cast<float*>(out), stride);
}

// x[0:count] (count ≤ 32, the rest zero) rounded to bf16, nearest even: lane p holds the pair
// (x[2p], x[2p + 1]).
inline __m512i load_bf16_pairs(const float* x, int64_t count) {
  if (count >= 32) return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x));
  const __mmask16 lo = (__mmask16)((1u << std::min<int64_t>(count, 16)) - 1);
  const __mmask16 hi = (__mmask16)((1u << std::max<int64_t>(count - 16, 0)) - 1);
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, x + 16), _mm512_maskz_loadu_ps(lo, x));
}
#endif

// ---- Writing a tile of y ------------------------------------------------------------------------
// y[0:count] = (first ? bias, or 0 without bias : y) + values, for a row segment of at most kLanes.
inline void add_segment(float* y, const float* values, int64_t count, bool first, const float* bias) {
#if defined(__AVX512F__)
  const __mmask16 m = (__mmask16)((1u << count) - 1);
  const __m512 base = first ? (bias ? _mm512_maskz_loadu_ps(m, bias) : _mm512_setzero_ps()) : _mm512_maskz_loadu_ps(m, y);
  _mm512_mask_storeu_ps(y, m, _mm512_add_ps(base, _mm512_loadu_ps(values)));
#else
  for (int64_t j = 0; j < count; ++j) y[j] = (first ? (bias ? bias[j] : 0.0f) : y[j]) + values[j];
#endif
}

// Rows arrangement: the R × (V·kLanes) tile c (c[i][v] = y[i, v·kLanes : (v+1)·kLanes]) into y, of
// which only the first `cols` columns exist: y = bias + c on the first panel (bias may be null),
// y += c on later ones.
template <int R, int V>
inline void store_tile(const vfloat (&c)[R][V], float* y, int64_t ldy, int64_t cols, bool first, const float* bias) {
  if (cols == V * kLanes) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const vfloat b = first && bias ? vload(bias + v * kLanes) : vzero();
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        float* yr = y + i * ldy + v * kLanes;
        vstore(yr, vadd(first ? b : vload(yr), c[i][v]));
      }
    }
    return;
  }
#if defined(__AVX512F__)
  // The last strip of W: masked loads and stores leave the accumulators in registers.
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    const int64_t width = std::min<int64_t>(kLanes, std::max<int64_t>(0, cols - v * kLanes));
    const __mmask16 m = (__mmask16)((1u << width) - 1);
    const vfloat b = first && bias ? _mm512_maskz_loadu_ps(m, bias + v * kLanes) : vzero();
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      float* yr = y + i * ldy + v * kLanes;
      _mm512_mask_storeu_ps(yr, m, vadd(first ? b : _mm512_maskz_loadu_ps(m, yr), c[i][v]));
    }
  }
#else
  for (int i = 0; i < R; ++i) {
    float values[V * kLanes];
    for (int v = 0; v < V; ++v) vstore(values + v * kLanes, c[i][v]);
    for (int64_t j0 = 0; j0 < cols; j0 += kLanes)
      add_segment(y + i * ldy + j0, values + j0, std::min<int64_t>(kLanes, cols - j0), first, bias ? bias + j0 : nullptr);
  }
#endif
}

// Columns arrangement: the tile c[NB][VM] (c[j][v] lane l = y[v·kLanes + l, j]) into y, `rows` ×
// `cols` of it, as store_tile.
template <int VM, int NB>
inline void store_columns(const vfloat (&c)[NB][VM], float* y, int64_t ldy, int64_t rows, int64_t cols, bool first,
                          const float* bias) {
  alignas(64) float block[kLanes * kLanes];
  for (int v = 0; v < VM && v * kLanes < rows; ++v) {
    const int64_t height = std::min<int64_t>(kLanes, rows - v * kLanes);
    for (int j0 = 0; j0 < NB && j0 < cols; j0 += kLanes) {
      vfloat regs[kLanes];  // columns j0 .. j0 + kLanes, zero past the strip
      for (int r = 0; r < kLanes; ++r) {
        const int j = j0 + r < NB ? j0 + r : NB - 1;
        regs[r] = j0 + r < NB ? c[j][v] : vzero();
      }
      store_transposed(regs, block, kLanes);
      const int64_t width = std::min<int64_t>({(int64_t)kLanes, (int64_t)NB - j0, cols - j0});
      for (int64_t l = 0; l < height; ++l)
        add_segment(y + (v * kLanes + l) * ldy + j0, block + l * kLanes, width, first, bias ? bias + j0 : nullptr);
    }
  }
}

// ---- Rows arrangement, f32 ----------------------------------------------------------------------
constexpr int64_t kRowsMaxDepth = 384;              // KC: a strip is KC × NR floats (48 KiB on AVX-512)
constexpr int64_t kRowsXStride = kRowsMaxDepth + 16;  // floats per packed row of x; a fixed stride lets
                                                      // the micro-kernel address its rows by constants

// kLanes weights of one row starting at k (a multiple of kLanes), widened to f32.
template <DType T>
inline vfloat load_lanes(const uint8_t* row, int64_t k) {
  if constexpr (T == DType::q8_0) {
    const BlockQ8_0* block = (const BlockQ8_0*)row + k / kQ8BlockSize;
    return vmul(vload_q8(block->qs + k % kQ8BlockSize), vbroadcast(scale_to_float(block->d)));
  } else {
    vfloat v;
    Format<T>::load(row, k, &v);
    return v;
  }
}

// W rows [n0, n0 + count) × k [k0, k0 + kc) as strips of NR rows, each strip k-major:
// packed[s·kc·NR + k·NR + j] = W[n0 + s·NR + j, k0 + k]. Rows are read kLanes at a time, widened and
// transposed in registers, so that each weight is read once and written once. The last strip packs
// only the registers of columns that hold rows; rows past the end repeat the last one (their columns
// of y are computed but never stored).
template <DType T>
void pack_weights(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t count, int64_t k0, int64_t kc,
                  float* packed) {
  for (int64_t s = 0; s * NR < count; ++s) {
    float* strip = packed + s * kc * NR;
    for (int64_t g = 0; g < NV && s * NR + g * kLanes < count; ++g) {
      const uint8_t* rows[kLanes];
      for (int j = 0; j < kLanes; ++j)
        rows[j] = w + (n0 + std::min<int64_t>(s * NR + g * kLanes + j, count - 1)) * row_bytes;
      float* out = strip + g * kLanes;
      int64_t k = 0;
      for (; k + kLanes <= kc; k += kLanes) {
        vfloat v[kLanes];
        for (int j = 0; j < kLanes; ++j) v[j] = load_lanes<T>(rows[j], k0 + k);
        store_transposed(v, out + k * NR, NR);
      }
      for (; k < kc; ++k)
        for (int j = 0; j < kLanes; ++j) out[k * NR + j] = Format<T>::element(rows[j], k0 + k);
    }
  }
}

// x rows [m0, m0 + count) × k [k0, k0 + kc) at a stride of kRowsXStride: packed[i·kRowsXStride + k].
void pack_inputs(const float* x, int64_t K, int64_t m0, int64_t count, int64_t k0, int64_t kc, float* packed) {
  for (int64_t i = 0; i < count; ++i)
    std::memcpy(packed + i * kRowsXStride, x + (m0 + i) * K + k0, kc * sizeof(float));
}

// Later panels add to y: fetching the tile while the panel is multiplied hides that latency.
template <int R>
inline void prefetch_tile(const float* y, int64_t ldy, int64_t cols) {
  for (int i = 0; i < R; ++i) {
    __builtin_prefetch(y + i * ldy);
    __builtin_prefetch(y + i * ldy + cols - 1);
  }
}

// The tile y[R, V·kLanes] over one panel: a holds R packed rows of x, b one strip of W.
template <int R, int V>
void rows_kernel(const float* a, const float* b, int64_t kc, float* y, int64_t ldy, int64_t cols, bool first,
                 const float* bias) {
  if (!first) prefetch_tile<R>(y, ldy, cols);
  vfloat c[R][V];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) c[i][v] = vzero();
  for (int64_t k = 0; k < kc; ++k) {
    vfloat bv[V];
    for (int v = 0; v < V; ++v) bv[v] = vload(b + k * NR + v * kLanes);
    for (int i = 0; i < R; ++i) {
      const vfloat av = vbroadcast(a[i * kRowsXStride + k]);
      for (int v = 0; v < V; ++v) c[i][v] = vfma(av, bv[v], c[i][v]);
    }
  }
  store_tile<R, V>(c, y, ldy, cols, first, bias);
}

// ---- Rows arrangement, bf16 × bf16 --------------------------------------------------------------
#if defined(__AVX512BF16__)
constexpr int64_t kRowsMaxDepthBf16 = 768;                      // KC: a strip is KC/2 pairs × NR × 4 bytes
constexpr int64_t kRowsXStrideBf16 = kRowsMaxDepthBf16 / 2 + 16;  // pairs per packed row of x

// W rows [n0, n0 + count) × k [k0, k0 + kc) as strips of NR rows, pair-major: with P = ⌈kc/2⌉,
// packed[s·P·NR + p·NR + j] = (W[n, k0 + 2p], W[n, k0 + 2p + 1]) for n = n0 + s·NR + j; an odd kc ends
// with (W[n, k0 + kc - 1], 0). A row of bf16 already is a row of such pairs, so packing is a transpose
// of 32-bit lanes, 16 × 16 at a time. Rows past the end repeat the last one, as in pack_weights.
void pack_weights_bf16(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t count, int64_t k0, int64_t kc,
                       uint32_t* packed) {
  const int64_t pairs = (kc + 1) / 2;
  for (int64_t s = 0; s * NR < count; ++s) {
    uint32_t* strip = packed + s * pairs * NR;
    for (int64_t g = 0; g < NV && s * NR + g * 16 < count; ++g) {
      const uint16_t* rows[16];
      for (int j = 0; j < 16; ++j)
        rows[j] = (const uint16_t*)(w + (n0 + std::min<int64_t>(s * NR + g * 16 + j, count - 1)) * row_bytes) + k0;
      uint32_t* out = strip + g * 16;
      __m512i v[16];
      int64_t k = 0;
      for (; k + 32 <= kc; k += 32) {
        for (int j = 0; j < 16; ++j) v[j] = _mm512_loadu_si512(rows[j] + k);
        store_transposed(v, out + (k / 2) * NR, NR);
      }
      if (k < kc) {  // the last < 32 values of each row, zero-filled to whole pairs
        const __mmask32 valid = (__mmask32)((1ull << (kc - k)) - 1);
        for (int j = 0; j < 16; ++j) v[j] = _mm512_maskz_loadu_epi16(valid, rows[j] + k);
        alignas(64) uint32_t block[16 * 16];
        store_transposed(v, block, 16);
        for (int64_t p = 0; p < (kc - k + 1) / 2; ++p)
          _mm512_storeu_si512(out + (k / 2 + p) * NR, _mm512_load_si512(block + p * 16));
      }
    }
  }
}

// x rows [m0, m0 + count) × k [k0, k0 + kc) rounded to bf16 as pairs (an odd kc ends with
// (x[m, k0 + kc - 1], 0)), at a stride of kRowsXStrideBf16 pairs.
void pack_inputs_bf16(const float* x, int64_t K, int64_t m0, int64_t count, int64_t k0, int64_t kc,
                      uint32_t* packed) {
  for (int64_t i = 0; i < count; ++i) {
    const float* src = x + (m0 + i) * K + k0;
    uint32_t* dst = packed + i * kRowsXStrideBf16;
    int64_t k = 0;
    for (; k + 32 <= kc; k += 32) _mm512_storeu_si512(dst + k / 2, load_bf16_pairs(src + k, 32));
    if (k < kc) {
      const __mmask16 pairs = (__mmask16)((1u << ((kc - k + 1) / 2)) - 1);
      _mm512_mask_storeu_epi32(dst + k / 2, pairs, load_bf16_pairs(src + k, kc - k));
    }
  }
}

template <int R, int V>
void rows_kernel_bf16(const uint32_t* a, const uint32_t* b, int64_t pairs, float* y, int64_t ldy, int64_t cols,
                      bool first, const float* bias) {
  if (!first) prefetch_tile<R>(y, ldy, cols);
  __m512 c[R][V];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) c[i][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[V];
    for (int v = 0; v < V; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + p * NR + v * 16);
    for (int i = 0; i < R; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[i * kRowsXStrideBf16 + p]);
      for (int v = 0; v < V; ++v) c[i][v] = _mm512_dpbf16_ps(c[i][v], av, bv[v]);
    }
  }
  store_tile<R, V>(c, y, ldy, cols, first, bias);
}
#endif

// ---- Columns arrangement, f32 -------------------------------------------------------------------
// A strip is NB output features; a tile VM registers of rows of x (VM·kLanes rows) by the strip.
// Narrow strips go with tiles of two registers, wide ones with one (when M ≤ kLanes): AVX-512 then
// keeps 28 accumulators, AVX2 and SSE2 12.
#if defined(__AVX512F__)
constexpr int kColumnsNarrow = 14;
constexpr int kColumnsWide = 28;
#else
constexpr int kColumnsNarrow = 6;
constexpr int kColumnsWide = 12;
#endif
constexpr int64_t kColumnsMaxDepth = 2048;               // f32 k per panel: a strip is up to 28 × 8 KiB
constexpr int64_t kColumnsStride = kColumnsMaxDepth + 16;  // floats per copied row of W
constexpr int64_t kColumnsMaxRows = 64;                  // rows of x per transposed block

// x rows [m0, m0 + count) × k [k0, k0 + kc), transposed per tile of H rows (H a multiple of kLanes):
// packed[t·kc·H + k·H + i] = x[m0 + t·H + i, k0 + k], zero past the last row.
template <int H>
void pack_inputs_transposed(const float* x, int64_t K, int64_t m0, int64_t count, int64_t k0, int64_t kc,
                            float* packed) {
  for (int64_t t = 0; t * H < count; ++t) {
    float* tile = packed + t * kc * H;
    for (int g = 0; g * kLanes < H; ++g) {
      const int64_t first_row = t * H + g * kLanes;
      const float* rows[kLanes];
      for (int i = 0; i < kLanes; ++i) rows[i] = first_row + i < count ? x + (m0 + first_row + i) * K + k0 : nullptr;
      int64_t k = 0;
      for (; k + kLanes <= kc; k += kLanes) {
        vfloat v[kLanes];
        for (int i = 0; i < kLanes; ++i) v[i] = rows[i] ? vload(rows[i] + k) : vzero();
        store_transposed(v, tile + k * H + g * kLanes, H);
      }
      for (; k < kc; ++k)
        for (int i = 0; i < kLanes; ++i) tile[k * H + g * kLanes + i] = rows[i] ? rows[i][k] : 0.0f;
    }
  }
}

// W rows [n0, n0 + nb) × k [k0, k0 + kc) widened to f32 at a stride of kColumnsStride; rows from
// `available` on repeat the last one (their columns of y are never stored).
template <DType T>
void copy_weight_rows(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t available, int nb, int64_t k0,
                      int64_t kc, float* strip) {
  for (int j = 0; j < nb; ++j)
    decode_row<T>(w + (n0 + std::min<int64_t>(j, available - 1)) * row_bytes, k0, kc, strip + j * kColumnsStride);
}

// The next strip's rows of W, fetched into L2 while this one is multiplied: two cache lines per k
// step covers a strip (at most 32 rows of kc weights of at most 4 bytes, in kc steps) when its rows
// are contiguous in W, i.e. when one panel spans all of K.
inline void prefetch_ahead(const char* ahead, int64_t step) {
  __builtin_prefetch(ahead + step * 128, 0, 2);
  __builtin_prefetch(ahead + step * 128 + 64, 0, 2);
}

// The tile y[rows ≤ VM·kLanes, cols ≤ NB] over one panel: xt holds the transposed tile of x (a k step
// every H floats), ws the strip of W; `ahead`, when not null, is the next strip's first row in W.
template <int VM, int NB, int H>
void columns_kernel(const float* xt, const float* ws, int64_t kc, float* y, int64_t ldy, int64_t rows, int64_t cols,
                    bool first, const float* bias, const char* ahead) {
  vfloat c[NB][VM];
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < VM; ++v) c[j][v] = vzero();
  for (int64_t k = 0; k < kc; ++k) {
    if (ahead) prefetch_ahead(ahead, k);
    vfloat xv[VM];
    for (int v = 0; v < VM; ++v) xv[v] = vload(xt + k * H + v * kLanes);
#pragma GCC unroll 32
    for (int j = 0; j < NB; ++j) {
      const vfloat wb = vbroadcast(ws[j * kColumnsStride + k]);
      for (int v = 0; v < VM; ++v) c[j][v] = vfma(wb, xv[v], c[j][v]);
    }
  }
  store_columns<VM, NB>(c, y, ldy, rows, cols, first, bias);
}

// ---- Columns arrangement, bf16 × bf16 -----------------------------------------------------------
#if defined(__AVX512BF16__)
constexpr int64_t kColumnsMaxDepthBf16 = 4096;                   // k per panel
constexpr int64_t kColumnsStrideBf16 = kColumnsMaxDepthBf16 / 2 + 16;  // pairs per copied row of W

// As pack_inputs_transposed, of x rounded to bf16 pairs: packed[t·P·H + p·H + i] = pair p of row
// m0 + t·H + i, P = ⌈kc/2⌉, an odd kc ending with (x[m, k0 + kc - 1], 0).
template <int H>
void pack_inputs_transposed_bf16(const float* x, int64_t K, int64_t m0, int64_t count, int64_t k0, int64_t kc,
                                 uint32_t* packed) {
  const int64_t pairs = (kc + 1) / 2;
  for (int64_t t = 0; t * H < count; ++t) {
    uint32_t* tile = packed + t * pairs * H;
    for (int g = 0; g * 16 < H; ++g) {
      const int64_t first_row = t * H + g * 16;
      const float* rows[16];
      for (int i = 0; i < 16; ++i) rows[i] = first_row + i < count ? x + (m0 + first_row + i) * K + k0 : nullptr;
      __m512i v[16];
      for (int64_t k = 0; k < kc; k += 32) {
        for (int i = 0; i < 16; ++i) v[i] = rows[i] ? load_bf16_pairs(rows[i] + k, kc - k) : _mm512_setzero_si512();
        if (k + 32 <= kc) {
          store_transposed(v, tile + (k / 2) * H + g * 16, H);
        } else {  // the last < 16 pairs
          alignas(64) uint32_t block[16 * 16];
          store_transposed(v, block, 16);
          for (int64_t p = 0; p < (kc - k + 1) / 2; ++p)
            _mm512_storeu_si512(tile + (k / 2 + p) * H + g * 16, _mm512_load_si512(block + p * 16));
        }
      }
    }
  }
}

// W rows [n0, n0 + nb) × k [k0, k0 + kc) as bf16 pairs at a stride of kColumnsStrideBf16 (an odd kc
// ends with (W[n, k0 + kc - 1], 0)); rows from `available` on repeat the last one.
void copy_weight_rows_bf16(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t available, int nb, int64_t k0,
                           int64_t kc, uint32_t* strip) {
  for (int j = 0; j < nb; ++j) {
    const uint16_t* row = (const uint16_t*)(w + (n0 + std::min<int64_t>(j, available - 1)) * row_bytes) + k0;
    uint16_t* out = reinterpret_cast<uint16_t*>(strip + j * kColumnsStrideBf16);
    std::memcpy(out, row, kc * sizeof(uint16_t));
    if (kc % 2) out[kc] = 0;
  }
}

// q8_0 row `row` of W, values [k0, k0 + kc) (k0 and kc multiples of 32), decoded as every f32 path
// decodes them (Format::load) and rounded to bf16 (nearest even) into out.
void q8_0_row_to_bf16(const uint8_t* w, int64_t row_bytes, int64_t row, int64_t k0, int64_t kc, uint16_t* out) {
  static_assert(kQ8BlockSize == 2 * kLanes, "a q8_0 block decodes to two registers");
  for (int64_t k = 0; k < kc; k += kQ8BlockSize) {
    vfloat v[2];
    Format<DType::q8_0>::load(w + row * row_bytes, k0 + k, v);
    _mm512_storeu_si512(out + k, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
  }
}

// As copy_weight_rows_bf16, from q8_0 weights.
void copy_weight_rows_q8_0_bf16(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t available, int nb, int64_t k0,
                                int64_t kc, uint32_t* strip) {
  for (int j = 0; j < nb; ++j)
    q8_0_row_to_bf16(w, row_bytes, n0 + std::min<int64_t>(j, available - 1), k0, kc,
                     reinterpret_cast<uint16_t*>(strip + j * kColumnsStrideBf16));
}

// As pack_weights_bf16, from q8_0 weights: the panel's rows go through bf16 rows first.
void pack_weights_q8_0_bf16(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t count, int64_t k0, int64_t kc,
                            uint32_t* packed) {
  static thread_local Scratch scratch;
  uint16_t* rows = reinterpret_cast<uint16_t*>(scratch.get((count * kc + 1) / 2));
  for (int64_t j = 0; j < count; ++j) q8_0_row_to_bf16(w, row_bytes, n0 + j, k0, kc, rows + j * kc);
  pack_weights_bf16(reinterpret_cast<const uint8_t*>(rows), kc * (int64_t)sizeof(uint16_t), 0, count, 0, kc, packed);
}

template <int VM, int NB, int H>
void columns_kernel_bf16(const uint32_t* xt, const uint32_t* ws, int64_t pairs, float* y, int64_t ldy, int64_t rows,
                         int64_t cols, bool first, const float* bias, const char* ahead) {
  __m512 c[NB][VM];
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < VM; ++v) c[j][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    if (ahead) prefetch_ahead(ahead, p);
    __m512bh xv[VM];
    for (int v = 0; v < VM; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(xt + p * H + v * 16);
#pragma GCC unroll 32
    for (int j = 0; j < NB; ++j) {
      const __m512bh wb = (__m512bh)_mm512_set1_epi32((int)ws[j * kColumnsStrideBf16 + p]);
      for (int v = 0; v < VM; ++v) c[j][v] = _mm512_dpbf16_ps(c[j][v], xv[v], wb);
    }
  }
  store_columns<VM, NB>(c, y, ldy, rows, cols, first, bias);
}
#endif

// ---- The arithmetic of each arrangement, as types -----------------------------------------------
template <typename E>
using RowsKernel = void (*)(const E*, const E*, int64_t, float*, int64_t, int64_t, bool, const float*);
// kernels[v - 1][r - 1]: a tile of r rows of x by v registers of output features.
template <typename E>
using RowsKernels = std::array<std::array<RowsKernel<E>, MR>, NV>;
static_assert(NV == 2, "the tables of rows kernels list one and two registers of output features");

template <typename E>
using ColumnsKernel = void (*)(const E*, const E*, int64_t, float*, int64_t, int64_t, int64_t, bool, const float*,
                               const char*);

template <int... R>
constexpr RowsKernels<float> make_rows_kernels(std::integer_sequence<int, R...>) {
  return {std::array<RowsKernel<float>, MR>{&rows_kernel<R + 1, 1>...},
          std::array<RowsKernel<float>, MR>{&rows_kernel<R + 1, 2>...}};
}

// f32 arithmetic on weights of dtype T.
template <DType T>
struct F32Math {
  using Elem = float;  // of the packed buffers
  static int64_t steps(int64_t kc) { return kc; }  // k steps of a panel kc deep

  static constexpr int64_t rows_max_depth = kRowsMaxDepth, rows_x_stride = kRowsXStride;
  static void pack_rows_w(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t count, int64_t k0, int64_t kc,
                          float* packed) {
    pack_weights<T>(w, row_bytes, n0, count, k0, kc, packed);
  }
  static void pack_rows_x(const float* x, int64_t K, int64_t m0, int64_t count, int64_t k0, int64_t kc, float* packed) {
    pack_inputs(x, K, m0, count, k0, kc, packed);
  }
  static constexpr RowsKernels<float> rows_kernels = make_rows_kernels(std::make_integer_sequence<int, MR>{});

  static constexpr int64_t columns_max_depth = kColumnsMaxDepth, columns_stride = kColumnsStride;
  template <int H>
  static void pack_columns_x(const float* x, int64_t K, int64_t m0, int64_t count, int64_t k0, int64_t kc,
                             float* packed) {
    pack_inputs_transposed<H>(x, K, m0, count, k0, kc, packed);
  }
  static void copy_columns_w(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t available, int nb, int64_t k0,
                             int64_t kc, float* strip) {
    copy_weight_rows<T>(w, row_bytes, n0, available, nb, k0, kc, strip);
  }
  static constexpr ColumnsKernel<float> wide = &columns_kernel<1, kColumnsWide, kLanes>;
  static constexpr ColumnsKernel<float> narrow = &columns_kernel<2, kColumnsNarrow, 2 * kLanes>;
  static constexpr ColumnsKernel<float> narrow_half = &columns_kernel<1, kColumnsNarrow, 2 * kLanes>;
};

#if defined(__AVX512BF16__)
template <int... R>
constexpr RowsKernels<uint32_t> make_rows_kernels_bf16(std::integer_sequence<int, R...>) {
  return {std::array<RowsKernel<uint32_t>, MR>{&rows_kernel_bf16<R + 1, 1>...},
          std::array<RowsKernel<uint32_t>, MR>{&rows_kernel_bf16<R + 1, 2>...}};
}

// bf16 × bf16 arithmetic on bf16 weights.
struct Bf16Math {
  using Elem = uint32_t;  // a pair of bf16
  static int64_t steps(int64_t kc) { return (kc + 1) / 2; }

  static constexpr int64_t rows_max_depth = kRowsMaxDepthBf16, rows_x_stride = kRowsXStrideBf16;
  static void pack_rows_w(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t count, int64_t k0, int64_t kc,
                          uint32_t* packed) {
    pack_weights_bf16(w, row_bytes, n0, count, k0, kc, packed);
  }
  static void pack_rows_x(const float* x, int64_t K, int64_t m0, int64_t count, int64_t k0, int64_t kc,
                          uint32_t* packed) {
    pack_inputs_bf16(x, K, m0, count, k0, kc, packed);
  }
  static constexpr RowsKernels<uint32_t> rows_kernels = make_rows_kernels_bf16(std::make_integer_sequence<int, MR>{});

  static constexpr int64_t columns_max_depth = kColumnsMaxDepthBf16, columns_stride = kColumnsStrideBf16;
  template <int H>
  static void pack_columns_x(const float* x, int64_t K, int64_t m0, int64_t count, int64_t k0, int64_t kc,
                             uint32_t* packed) {
    pack_inputs_transposed_bf16<H>(x, K, m0, count, k0, kc, packed);
  }
  static void copy_columns_w(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t available, int nb, int64_t k0,
                             int64_t kc, uint32_t* strip) {
    copy_weight_rows_bf16(w, row_bytes, n0, available, nb, k0, kc, strip);
  }
  static constexpr ColumnsKernel<uint32_t> wide = &columns_kernel_bf16<1, kColumnsWide, 16>;
  static constexpr ColumnsKernel<uint32_t> narrow = &columns_kernel_bf16<2, kColumnsNarrow, 32>;
  static constexpr ColumnsKernel<uint32_t> narrow_half = &columns_kernel_bf16<1, kColumnsNarrow, 32>;
};

// bf16 × bf16 arithmetic on q8_0 weights, rounded to bf16 as they are packed or copied (gemm_step).
struct Q8Bf16Math : Bf16Math {
  static void pack_rows_w(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t count, int64_t k0, int64_t kc,
                          uint32_t* packed) {
    pack_weights_q8_0_bf16(w, row_bytes, n0, count, k0, kc, packed);
  }
  static void copy_columns_w(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t available, int nb, int64_t k0,
                             int64_t kc, uint32_t* strip) {
    copy_weight_rows_q8_0_bf16(w, row_bytes, n0, available, nb, k0, kc, strip);
  }
};
#endif

// ---- The blocked loops --------------------------------------------------------------------------
// Rows arrangement: y[m_begin:m_end, n_begin:n_end] on the calling thread.
template <typename Math>
void gemm_rows(const float* x, const uint8_t* w, int64_t row_bytes, const float* bias, float* y, int64_t N, int64_t K,
               int64_t m_begin, int64_t m_end, int64_t n_begin, int64_t n_end) {
  using E = typename Math::Elem;
  static_assert(sizeof(E) == sizeof(float), "the packed buffers share the per-thread float scratch");
  const int64_t depth = panel_depth(K, Math::rows_max_depth);
  const int64_t packed_w_size = NC * Math::steps(depth), packed_x_size = MC * Math::rows_x_stride;
  E* packed_w = reinterpret_cast<E*>(t_scratch.get(packed_w_size + packed_x_size));
  E* packed_x = packed_w + packed_w_size;

  for (int64_t n0 = n_begin; n0 < n_end; n0 += NC) {
    const int64_t nc = std::min(NC, n_end - n0);
    for (int64_t k0 = 0; k0 < K; k0 += depth) {
      const int64_t kc = std::min(depth, K - k0), steps = Math::steps(kc);
      const bool first = k0 == 0;
      Math::pack_rows_w(w, row_bytes, n0, nc, k0, kc, packed_w);
      for (int64_t m0 = m_begin; m0 < m_end; m0 += MC) {
        const int64_t mc = std::min(MC, m_end - m0);
        Math::pack_rows_x(x, K, m0, mc, k0, kc, packed_x);
        for (int64_t s = 0; s * NR < nc; ++s) {
          const int64_t n = n0 + s * NR;
          const int64_t cols = std::min<int64_t>(NR, nc - s * NR);
          const auto& kernels = Math::rows_kernels[(cols + kLanes - 1) / kLanes - 1];
          const E* b = packed_w + s * steps * NR;
          for (int64_t t = 0; t * MR < mc; ++t) {
            const int64_t m = m0 + t * MR;
            const int64_t r = std::min<int64_t>(MR, mc - t * MR);
            kernels[r - 1](packed_x + t * MR * Math::rows_x_stride, b, steps, y + m * N + n, N, cols, first,
                           bias ? bias + n : nullptr);
          }
        }
      }
    }
  }
}

// Columns arrangement: tiles of one register of rows with wide strips when all of x fits in one.
inline bool one_register_of_rows(int64_t M) { return M <= kLanes; }
inline int64_t columns_strip(int64_t M) { return one_register_of_rows(M) ? kColumnsWide : kColumnsNarrow; }

// Columns arrangement: y[0:M, n_begin:n_end] on the calling thread.
template <typename Math>
void gemm_columns(const float* x, const uint8_t* w, int64_t row_bytes, const float* bias, float* y, int64_t M,
                  int64_t N, int64_t K, int64_t n_begin, int64_t n_end) {
  using E = typename Math::Elem;
  const bool one_register = one_register_of_rows(M);
  const int H = one_register ? kLanes : 2 * kLanes;
  const int NB = (int)columns_strip(M);
  const int64_t depth = panel_depth(K, Math::columns_max_depth);
  const int64_t block_rows = std::min<int64_t>(kColumnsMaxRows, (M + H - 1) / H * H);
  const int64_t packed_x_size = block_rows * Math::steps(depth), strip_size = NB * Math::columns_stride;
  E* packed_x = reinterpret_cast<E*>(t_scratch.get(packed_x_size + strip_size));
  E* strip = packed_x + packed_x_size;
  const bool prefetch = depth >= K;  // the next strip's rows are one contiguous run of W
  for (int64_t k0 = 0; k0 < K; k0 += depth) {
    const int64_t kc = std::min(depth, K - k0), steps = Math::steps(kc);
    const bool first = k0 == 0;
    for (int64_t m0 = 0; m0 < M; m0 += block_rows) {
      const int64_t mc = std::min(block_rows, M - m0);
      if (one_register) Math::template pack_columns_x<kLanes>(x, K, m0, mc, k0, kc, packed_x);
      else Math::template pack_columns_x<2 * kLanes>(x, K, m0, mc, k0, kc, packed_x);
      for (int64_t n0 = n_begin; n0 < n_end; n0 += NB) {
        const int64_t cols = std::min<int64_t>(NB, n_end - n0);
        Math::copy_columns_w(w, row_bytes, n0, N - n0, NB, k0, kc, strip);
        const char* ahead = prefetch && n0 + NB < n_end ? (const char*)(w + (n0 + NB) * row_bytes) : nullptr;
        for (int64_t t = 0; t * H < mc; ++t) {
          const int64_t rows = std::min<int64_t>(H, mc - t * H);
          const ColumnsKernel<E> kernel = one_register ? Math::wide : rows > kLanes ? Math::narrow : Math::narrow_half;
          kernel(packed_x + t * steps * H, strip, steps, y + (m0 + t * H) * N + n0, N, rows, cols, first,
                 bias ? bias + n0 : nullptr, t == 0 ? ahead : nullptr);
        }
      }
    }
  }
}

// The columns arrangement pays where packing W would cost a large share of the arithmetic: few rows
// of x (up to kColumnsMaxRows), filling whole registers but for at most a few rows (a tile of one or
// two rows over a whole register costs as much as a full one), and enough output features to split.
inline bool use_columns(int64_t M, int64_t N) {
  const int64_t spare = (kLanes - M % kLanes) % kLanes;
  return M <= kColumnsMaxRows && 2 * spare < kLanes && N >= 4 * columns_strip(M) * num_threads();
}

template <typename Math>
void gemm_parallel(const float* x, const uint8_t* w, int64_t row_bytes, const float* bias, float* y, int64_t M,
                   int64_t N, int64_t K) {
  if (use_columns(M, N)) {
    const int64_t NB = columns_strip(M), strips = (N + NB - 1) / NB;
    const int64_t min_strips = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, M * NB * K));
    parallel_for(strips, min_strips, [&](int64_t begin, int64_t end) {
      gemm_columns<Math>(x, w, row_bytes, bias, y, M, N, K, begin * NB, std::min(N, end * NB));
    });
    return;
  }
  const int64_t strips = (N + NR - 1) / NR;
  const int threads = num_threads();
  // Split the output features among the threads, each packing all of x; or, for a tall x (M ≥ 4·N,
  // as training's 4096-row products of 256 to 1024 features), the rows, each thread packing its share
  // of x and all of W, the smaller copy: 79% → 87% of the FMA peak at 4096 × 256 × 1024.
  const bool split_rows = M >= 4 * N && M >= 8 * MR * threads;
  if (!split_rows && (strips >= 4 * threads || M < 2 * MR * threads)) {
    const int64_t min_strips = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, M * NR * K));
    parallel_for(strips, min_strips, [&](int64_t begin, int64_t end) {
      gemm_rows<Math>(x, w, row_bytes, bias, y, N, K, 0, M, begin * NR, std::min(N, end * NR));
    });
  } else {
    // Few output features or a tall x: split the rows of x (each thread packs W itself).
    const int64_t tiles = (M + MR - 1) / MR;
    parallel_for(tiles, 1, [&](int64_t begin, int64_t end) {
      gemm_rows<Math>(x, w, row_bytes, bias, y, N, K, begin * MR, std::min(M, end * MR), 0, N);
    });
  }
}

template <DType T>
void gemm_prefill_typed(const float* x, const uint8_t* w, const float* bias, float* y, int64_t M, int64_t N,
                        int64_t K) {
  const int64_t row_bytes = Format<T>::row_bytes(K);
#if defined(__AVX512BF16__)
  if constexpr (T == DType::bf16) {
    gemm_parallel<Bf16Math>(x, w, row_bytes, bias, y, M, N, K);
    return;
  }
#endif
  gemm_parallel<F32Math<T>>(x, w, row_bytes, bias, y, M, N, K);
}

}  // namespace

void gemm_step(const float* x, const uint8_t* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N,
               int64_t K) {
#if defined(__AVX512BF16__)
  if (w_dtype == DType::q8_0) {
    gemm_parallel<Q8Bf16Math>(x, w, Format<DType::q8_0>::row_bytes(K), bias, y, M, N, K);
    return;
  }
#endif
  gemm_prefill(x, w, w_dtype, bias, y, M, N, K);
}

void gemm_prefill(const float* x, const uint8_t* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N,
                  int64_t K) {
  switch (w_dtype) {
    case DType::f32: gemm_prefill_typed<DType::f32>(x, w, bias, y, M, N, K); return;
    case DType::f16: gemm_prefill_typed<DType::f16>(x, w, bias, y, M, N, K); return;
    case DType::bf16: gemm_prefill_typed<DType::bf16>(x, w, bias, y, M, N, K); return;
    case DType::q8_0: gemm_prefill_typed<DType::q8_0>(x, w, bias, y, M, N, K); return;
    default: break;
  }
  std::fprintf(stderr, "mamba-ssm: matmul: unsupported weight dtype %s\n", dtype_name(w_dtype));
  std::abort();
}

}  // namespace gemm_detail
}  // namespace mssm::cpu::MSSM_LEVEL
