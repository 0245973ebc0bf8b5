// Matrix products with weights stored as f32, f16, bf16 or q8_0, and conversions between dtypes.
//
// Glossary (shapes as in kernels.h):
//   M, N, K   y[M,N] = x[M,K] · W[N,K]ᵀ (+ bias[N]): rows of x, output features, input features
//   lanes     floats in one SIMD register at this level (16 AVX-512, 8 AVX2, 4 SSE2 or plain C++)
//   unit      elements decoded from a weight row in one step: one register, or one q8_0 block (32)
//   MR × NR   the register tile of the prefill micro-kernel: MR rows of x by NR output features
//   KC        depth (in K) of one packed panel;  MC, NC  rows of x / output features per cache block
//
// Two paths, chosen by M. Decode (few rows of x) is bound by reading W: each weight row is streamed
// once, widened to f32 in registers and dotted with every row of x. Prefill (many rows) is bound by
// FMAs: panels of W are widened to f32 and packed k-major into per-thread scratch, panels of x likewise,
// and an MR × NR block of accumulators stays in registers over each KC-deep panel, so every weight
// dtype runs at the f32 FMA rate.
#include "level.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's own AVX-512 headers trip these on their _mm512_undefined_* values (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "../core/threadpool.h"

namespace mssm::cpu::MSSM_LEVEL {
namespace {

// f16 → f32 without branches: shifting the half's exponent and mantissa into place and multiplying by
// 2^112 rebiases the exponent, and turns half subnormals into the right normal floats; an all-ones
// exponent (inf, NaN) is restored afterwards.
inline float half_to_float(uint16_t h) {
  uint32_t magnitude = (uint32_t)(h & 0x7fffu) << 13;
  uint32_t bits = f32_bits(bits_f32(magnitude) * 0x1p112f);
  if (magnitude >= 0x0f800000u) bits |= 0x7f800000u;
  return bits_f32(bits | (uint32_t)(h & 0x8000u) << 16);
}

// ---- One SIMD register of floats, per level ----------------------------------------------------
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kRegisters = 32;
using vfloat = __m512;
inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
inline vfloat vbroadcast(float a) { return _mm512_set1_ps(a); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline float vsum(vfloat v) { return _mm512_reduce_add_ps(v); }
inline vfloat vload_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline vfloat vload_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline vfloat vload_q8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
inline float scale_to_float(uint16_t h) { return _cvtsh_ss(h); }

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
using vfloat = __m256;
inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline vfloat vbroadcast(float a) { return _mm256_set1_ps(a); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline float vsum(vfloat v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
inline vfloat vload_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline vfloat vload_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline vfloat vload_q8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
inline float scale_to_float(uint16_t h) { return _cvtsh_ss(h); }

#elif defined(__SSE2__)
constexpr int kLanes = 4;
constexpr int kRegisters = 16;
using vfloat = __m128;
inline vfloat vzero() { return _mm_setzero_ps(); }
inline vfloat vload(const float* p) { return _mm_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm_storeu_ps(p, v); }
inline vfloat vbroadcast(float a) { return _mm_set1_ps(a); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm_add_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm_mul_ps(a, b); }
inline float vsum(vfloat v) {
  __m128 s = _mm_add_ps(v, _mm_movehl_ps(v, v));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
// The same steps as half_to_float, four at a time.
inline vfloat vload_f16(const uint16_t* p) {
  __m128i h = _mm_unpacklo_epi16(_mm_loadl_epi64((const __m128i*)p), _mm_setzero_si128());
  __m128i magnitude = _mm_slli_epi32(_mm_and_si128(h, _mm_set1_epi32(0x7fff)), 13);
  __m128 value = _mm_mul_ps(_mm_castsi128_ps(magnitude), _mm_set1_ps(0x1p112f));
  __m128i special = _mm_and_si128(_mm_cmpgt_epi32(magnitude, _mm_set1_epi32(0x0f7fffff)), _mm_set1_epi32(0x7f800000));
  __m128i sign = _mm_slli_epi32(_mm_and_si128(h, _mm_set1_epi32(0x8000)), 16);
  return _mm_castsi128_ps(_mm_or_si128(_mm_or_si128(_mm_castps_si128(value), special), sign));
}
inline vfloat vload_bf16(const uint16_t* p) {
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), _mm_loadl_epi64((const __m128i*)p)));
}
// Sign-extends four int8 by repeating each byte into all four bytes of its lane, then shifting right.
inline vfloat vload_q8(const int8_t* p) {
  int32_t packed;
  std::memcpy(&packed, p, 4);
  __m128i b = _mm_cvtsi32_si128(packed);
  b = _mm_unpacklo_epi8(b, b);
  b = _mm_unpacklo_epi16(b, b);
  return _mm_cvtepi32_ps(_mm_srai_epi32(b, 24));
}
inline float scale_to_float(uint16_t h) { return half_to_float(h); }

#else  // no SIMD: plain arrays the compiler may still vectorise
constexpr int kLanes = 4;
constexpr int kRegisters = 16;
struct vfloat { float v[kLanes]; };
inline vfloat vzero() { return vfloat{}; }
inline vfloat vload(const float* p) { vfloat r; for (int i = 0; i < kLanes; ++i) r.v[i] = p[i]; return r; }
inline void vstore(float* p, vfloat a) { for (int i = 0; i < kLanes; ++i) p[i] = a.v[i]; }
inline vfloat vbroadcast(float a) { vfloat r; for (int i = 0; i < kLanes; ++i) r.v[i] = a; return r; }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { for (int i = 0; i < kLanes; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
inline vfloat vadd(vfloat a, vfloat b) { for (int i = 0; i < kLanes; ++i) a.v[i] += b.v[i]; return a; }
inline vfloat vmul(vfloat a, vfloat b) { for (int i = 0; i < kLanes; ++i) a.v[i] *= b.v[i]; return a; }
inline float vsum(vfloat a) { return (a.v[0] + a.v[2]) + (a.v[1] + a.v[3]); }
inline vfloat vload_f16(const uint16_t* p) { vfloat r; for (int i = 0; i < kLanes; ++i) r.v[i] = half_to_float(p[i]); return r; }
inline vfloat vload_bf16(const uint16_t* p) { vfloat r; for (int i = 0; i < kLanes; ++i) r.v[i] = bf16_to_f32(p[i]); return r; }
inline vfloat vload_q8(const int8_t* p) { vfloat r; for (int i = 0; i < kLanes; ++i) r.v[i] = (float)p[i]; return r; }
inline float scale_to_float(uint16_t h) { return half_to_float(h); }
#endif

// ---- Reading weight rows of each dtype ----------------------------------------------------------
// Format<T>::load decodes the `unit` elements starting at k (a multiple of unit) into unit / kLanes
// registers; element() decodes one, for the tail of a row that is not a whole unit.
template <DType T> struct Format;

template <> struct Format<DType::f32> {
  static constexpr int64_t unit = kLanes;
  static int64_t row_bytes(int64_t K) { return K * 4; }
  static void load(const uint8_t* row, int64_t k, vfloat* out) { out[0] = vload((const float*)row + k); }
  static float element(const uint8_t* row, int64_t k) { return ((const float*)row)[k]; }
};

template <> struct Format<DType::f16> {
  static constexpr int64_t unit = kLanes;
  static int64_t row_bytes(int64_t K) { return K * 2; }
  static void load(const uint8_t* row, int64_t k, vfloat* out) { out[0] = vload_f16((const uint16_t*)row + k); }
  static float element(const uint8_t* row, int64_t k) { return half_to_float(((const uint16_t*)row)[k]); }
};

template <> struct Format<DType::bf16> {
  static constexpr int64_t unit = kLanes;
  static int64_t row_bytes(int64_t K) { return K * 2; }
  static void load(const uint8_t* row, int64_t k, vfloat* out) { out[0] = vload_bf16((const uint16_t*)row + k); }
  static float element(const uint8_t* row, int64_t k) { return bf16_to_f32(((const uint16_t*)row)[k]); }
};

// x = q · d; the product of an int8 and an fp16 scale is exact in f32, so this equals the scalar
// dequantisation bit for bit.
template <> struct Format<DType::q8_0> {
  static constexpr int64_t unit = kQ8BlockSize;
  static int64_t row_bytes(int64_t K) { return (K / kQ8BlockSize) * (int64_t)sizeof(BlockQ8_0); }
  static void load(const uint8_t* row, int64_t k, vfloat* out) {
    const BlockQ8_0* block = (const BlockQ8_0*)row + k / kQ8BlockSize;
    vfloat scale = vbroadcast(scale_to_float(block->d));
    for (int i = 0; i < kQ8BlockSize / kLanes; ++i) out[i] = vmul(vload_q8(block->qs + i * kLanes), scale);
  }
  static float element(const uint8_t* row, int64_t k) {
    const BlockQ8_0* block = (const BlockQ8_0*)row + k / kQ8BlockSize;
    return (float)block->qs[k % kQ8BlockSize] * scale_to_float(block->d);
  }
};

// Decodes elements [k_begin, k_begin + count) of one row to f32; k_begin is a multiple of the unit.
template <DType T>
void decode_row(const uint8_t* row, int64_t k_begin, int64_t count, float* out) {
  using F = Format<T>;
  constexpr int vectors = (int)(F::unit / kLanes);
  int64_t i = 0;
  for (; i + F::unit <= count; i += F::unit) {
    vfloat v[vectors];
    F::load(row, k_begin + i, v);
    for (int j = 0; j < vectors; ++j) vstore(out + i + j * kLanes, v[j]);
  }
  for (; i < count; ++i) out[i] = F::element(row, k_begin + i);
}

// ---- Decode: few rows of x, each weight row read once ------------------------------------------
// sums[m] = x[m, 0:count] · row[0:count] for the MT rows of x (x_stride apart). The step of the main
// loop holds several registers of weights so that independent accumulators hide the FMA latency.
template <DType T, int MT>
void dot_row(const float* x, int64_t x_stride, int64_t count, const uint8_t* row, float* sums) {
  using F = Format<T>;
  constexpr int vectors_per_unit = (int)(F::unit / kLanes);
  constexpr int wanted = MT == 1 ? 4 : 2;
  constexpr int units_per_step = wanted / vectors_per_unit > 1 ? wanted / vectors_per_unit : 1;
  constexpr int vectors = units_per_step * vectors_per_unit;
  constexpr int budget = kRegisters / 2 / MT > 1 ? kRegisters / 2 / MT : 1;
  constexpr int accumulators = vectors < budget ? vectors : budget;
  constexpr int64_t step = units_per_step * F::unit;

  vfloat acc[MT][accumulators];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < accumulators; ++a) acc[m][a] = vzero();

  int64_t k = 0;
  for (; k + step <= count; k += step) {
    vfloat w[vectors];
    for (int u = 0; u < units_per_step; ++u) F::load(row, k + u * F::unit, w + u * vectors_per_unit);
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < vectors; ++v)
        acc[m][v % accumulators] = vfma(w[v], vload(x + m * x_stride + k + v * kLanes), acc[m][v % accumulators]);
  }
  for (; k + F::unit <= count; k += F::unit) {
    vfloat w[vectors_per_unit];
    F::load(row, k, w);
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < vectors_per_unit; ++v)
        acc[m][v % accumulators] = vfma(w[v], vload(x + m * x_stride + k + v * kLanes), acc[m][v % accumulators]);
  }
  for (int m = 0; m < MT; ++m) {
    vfloat total = acc[m][0];
    for (int a = 1; a < accumulators; ++a) total = vadd(total, acc[m][a]);
    sums[m] = vsum(total);
  }
  for (; k < count; ++k) {
    float w = F::element(row, k);
    for (int m = 0; m < MT; ++m) sums[m] += w * x[m * x_stride + k];
  }
}

constexpr int kDecodeTile = 4;  // rows of x per dot_row call

template <DType T>
void matvec_rows(const float* x, const uint8_t* w, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                 int64_t n_begin, int64_t n_end) {
  const int64_t row_bytes = Format<T>::row_bytes(K);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = w + n * row_bytes;
    const float b = bias ? bias[n] : 0.0f;
    // The weight row is fetched from memory by the first tile; later tiles find it in cache.
    for (int64_t m0 = 0; m0 < M; m0 += kDecodeTile) {
      float sums[kDecodeTile];
      const float* xt = x + m0 * K;
      switch (std::min<int64_t>(kDecodeTile, M - m0)) {
        case 1: dot_row<T, 1>(xt, K, K, row, sums); break;
        case 2: dot_row<T, 2>(xt, K, K, row, sums); break;
        case 3: dot_row<T, 3>(xt, K, K, row, sums); break;
        default: dot_row<T, 4>(xt, K, K, row, sums); break;
      }
      for (int64_t m = m0; m < std::min<int64_t>(M, m0 + kDecodeTile); ++m) y[m * N + n] = sums[m - m0] + b;
    }
  }
}

// ---- Prefill: packed panels and a register-blocked micro-kernel --------------------------------
constexpr int NR = 2 * kLanes;
#if defined(__AVX512F__)
constexpr int MR = 8;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int MR = 6;
#else
constexpr int MR = 4;
#endif
constexpr int64_t KC = 256;
constexpr int64_t MC = 24 * MR;    // a packed block of x: MC × KC floats, kept in L2
constexpr int64_t NC = 32 * NR;    // a packed block of W: NC × KC floats, read strip by strip

// Per-thread scratch, grown on demand and kept for the next call.
struct Scratch {
  float* data = nullptr;
  int64_t capacity = 0;
  ~Scratch() { ::operator delete[](data, std::align_val_t(64)); }
  float* get(int64_t count) {
    if (count > capacity) {
      ::operator delete[](data, std::align_val_t(64));
      data = static_cast<float*>(::operator new[](count * sizeof(float), std::align_val_t(64)));
      capacity = count;
    }
    return data;
  }
};
thread_local Scratch t_scratch;

// W rows [n0, n0 + count) × k [k0, k0 + kc) as strips of NR rows, each strip k-major: strip s holds
// packed[s·kc·NR + k·NR + j] = W[n0 + s·NR + j, k0 + k], zero past the last row.
// The rows are first decoded into `rows` at a stride of kRowStride floats, which is not a multiple of
// 1 KiB so that reading down a column does not map every row to the same few L1 sets.
constexpr int64_t kRowStride = KC + 16;

template <DType T>
void pack_weights(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t count, int64_t k0, int64_t kc,
                  float* packed, float* rows) {
  for (int64_t s = 0; s * NR < count; ++s) {
    const int64_t valid = std::min<int64_t>(NR, count - s * NR);
    for (int64_t j = 0; j < valid; ++j)
      decode_row<T>(w + (n0 + s * NR + j) * row_bytes, k0, kc, rows + j * kRowStride);
    for (int64_t j = valid; j < NR; ++j) std::fill(rows + j * kRowStride, rows + j * kRowStride + kc, 0.0f);
    float* strip = packed + s * kc * NR;
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t j = 0; j < NR; ++j) strip[k * NR + j] = rows[j * kRowStride + k];
  }
}

// x rows [m0, m0 + count) × k [k0, k0 + kc) as tiles of MR rows (the last may be shorter, r rows),
// each tile k-major: packed[t·MR·kc + k·r + i] = x[m0 + t·MR + i, k0 + k].
void pack_inputs(const float* x, int64_t K, int64_t m0, int64_t count, int64_t k0, int64_t kc, float* packed) {
  for (int64_t t = 0; t * MR < count; ++t) {
    const int64_t r = std::min<int64_t>(MR, count - t * MR);
    float* tile = packed + t * MR * kc;
    for (int64_t i = 0; i < r; ++i) {
      const float* src = x + (m0 + t * MR + i) * K + k0;
      for (int64_t k = 0; k < kc; ++k) tile[k * r + i] = src[k];
    }
  }
}

// y[R, cols] (= bias or 0 when first, else +=) a[kc, R]ᵀ · b[kc, NR], with R × NR accumulators in registers.
template <int R>
void micro_kernel(const float* a, const float* b, int64_t kc, float* y, int64_t ldy, int64_t cols, bool first,
                  const float* bias) {
  vfloat c0[R], c1[R];
  for (int i = 0; i < R; ++i) c0[i] = c1[i] = vzero();
  for (int64_t k = 0; k < kc; ++k) {
    const vfloat b0 = vload(b + k * NR), b1 = vload(b + k * NR + kLanes);
    for (int i = 0; i < R; ++i) {
      const vfloat av = vbroadcast(a[k * R + i]);
      c0[i] = vfma(av, b0, c0[i]);
      c1[i] = vfma(av, b1, c1[i]);
    }
  }
  if (cols == NR) {
    const vfloat bias0 = bias ? vload(bias) : vzero(), bias1 = bias ? vload(bias + kLanes) : vzero();
    for (int i = 0; i < R; ++i) {
      float* yr = y + i * ldy;
      vstore(yr, vadd(first ? bias0 : vload(yr), c0[i]));
      vstore(yr + kLanes, vadd(first ? bias1 : vload(yr + kLanes), c1[i]));
    }
  } else {
    for (int i = 0; i < R; ++i) {
      float tile[NR];
      vstore(tile, c0[i]);
      vstore(tile + kLanes, c1[i]);
      float* yr = y + i * ldy;
      for (int64_t j = 0; j < cols; ++j) yr[j] = (first ? (bias ? bias[j] : 0.0f) : yr[j]) + tile[j];
    }
  }
}

using MicroKernel = void (*)(const float*, const float*, int64_t, float*, int64_t, int64_t, bool, const float*);

template <int... R>
constexpr auto make_micro_kernels(std::integer_sequence<int, R...>) {
  return std::array<MicroKernel, sizeof...(R)>{&micro_kernel<R + 1>...};
}
// micro_kernels[r - 1] handles a tile of r rows.
constexpr auto micro_kernels = make_micro_kernels(std::make_integer_sequence<int, MR>{});

// The rectangle y[m_begin:m_end, n_begin:n_end] on the calling thread.
template <DType T>
void gemm_block(const float* x, const uint8_t* w, const float* bias, float* y, int64_t N, int64_t K,
                int64_t m_begin, int64_t m_end, int64_t n_begin, int64_t n_end) {
  const int64_t row_bytes = Format<T>::row_bytes(K);
  const int64_t packed_w_size = NC * KC, packed_x_size = MC * KC, rows_size = NR * kRowStride;
  float* scratch = t_scratch.get(packed_w_size + packed_x_size + rows_size);
  float* packed_w = scratch;
  float* packed_x = scratch + packed_w_size;
  float* rows = packed_x + packed_x_size;

  for (int64_t n0 = n_begin; n0 < n_end; n0 += NC) {
    const int64_t nc = std::min(NC, n_end - n0);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      const bool first = k0 == 0;
      pack_weights<T>(w, row_bytes, n0, nc, k0, kc, packed_w, rows);
      for (int64_t m0 = m_begin; m0 < m_end; m0 += MC) {
        const int64_t mc = std::min(MC, m_end - m0);
        pack_inputs(x, K, m0, mc, k0, kc, packed_x);
        for (int64_t s = 0; s * NR < nc; ++s) {
          const int64_t n = n0 + s * NR;
          const int64_t cols = std::min<int64_t>(NR, nc - s * NR);
          const float* b = packed_w + s * kc * NR;
          for (int64_t t = 0; t * MR < mc; ++t) {
            const int64_t m = m0 + t * MR;
            const int64_t r = std::min<int64_t>(MR, mc - t * MR);
            micro_kernels[r - 1](packed_x + t * MR * kc, b, kc, y + m * N + n, N, cols, first,
                                 bias ? bias + n : nullptr);
          }
        }
      }
    }
  }
}

// Up to this many rows of x, streaming W once (decode) beats packing it.
constexpr int64_t kDecodeMaxRows = 8;
// Multiply-adds below which a thread is not worth waking.
constexpr int64_t kMinWorkPerThread = 1 << 16;

template <DType T>
void matmul_typed(const float* x, const void* w_any, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  const uint8_t* w = static_cast<const uint8_t*>(w_any);
  if (M <= kDecodeMaxRows) {
    const int64_t min_rows = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, M * K));
    parallel_for(N, min_rows, [&](int64_t begin, int64_t end) { matvec_rows<T>(x, w, bias, y, M, N, K, begin, end); });
    return;
  }
  const int64_t strips = (N + NR - 1) / NR;
  const int threads = num_threads();
  if (strips >= 4 * threads || M < 2 * MR * threads) {
    const int64_t min_strips = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, M * NR * K));
    parallel_for(strips, min_strips, [&](int64_t begin, int64_t end) {
      gemm_block<T>(x, w, bias, y, N, K, 0, M, begin * NR, std::min(N, end * NR));
    });
  } else {
    // Few output features: split the rows of x instead (each thread packs the small W itself).
    const int64_t tiles = (M + MR - 1) / MR;
    parallel_for(tiles, 1, [&](int64_t begin, int64_t end) {
      gemm_block<T>(x, w, bias, y, N, K, begin * MR, std::min(M, end * MR), 0, N);
    });
  }
}

// ---- Conversions -------------------------------------------------------------------------------
// GGUF's q8_0: d = amax / 127 stored as fp16, q = round(x · (1 / d)) (half away from zero), all-zero
// block: d = 0, q = 0. Like ggml, the reciprocal of the unrounded f32 d is used.
void quantize_q8_0(const float* src, BlockQ8_0* dst, int64_t blocks) {
  for (int64_t b = 0; b < blocks; ++b) {
    const float* v = src + b * kQ8BlockSize;
    float amax = 0.0f;
    for (int i = 0; i < kQ8BlockSize; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float d = amax / 127.0f;
    const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
    dst[b].d = f32_to_f16(d);
    for (int i = 0; i < kQ8BlockSize; ++i) dst[b].qs[i] = (int8_t)std::round(v[i] * inverse);
  }
}

void encode_f16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  // The hardware rounds to nearest even as f32_to_f16 does; NaN payloads differ, so a group holding a
  // NaN takes the scalar path.
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(src + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) {
      for (int j = 0; j < 8; ++j) dst[i + j] = f32_to_f16(src[i + j]);
    } else {
      _mm_storeu_si128((__m128i*)(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}

void encode_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

void decode_to_f32(const void* src, DType dtype, float* dst, int64_t n) {
  const uint8_t* bytes = static_cast<const uint8_t*>(src);
  switch (dtype) {
    case DType::f32: std::memcpy(dst, src, n * sizeof(float)); return;
    case DType::f16: decode_row<DType::f16>(bytes, 0, n, dst); return;
    case DType::bf16: decode_row<DType::bf16>(bytes, 0, n, dst); return;
    case DType::q8_0: decode_row<DType::q8_0>(bytes, 0, n, dst); return;
    default: break;
  }
  std::fprintf(stderr, "mamba-ssm: convert: cannot read %s as f32\n", dtype_name(dtype));
  std::abort();
}

void encode_from_f32(const float* src, DType dtype, void* dst, int64_t n) {
  switch (dtype) {
    case DType::f32: std::memcpy(dst, src, n * sizeof(float)); return;
    case DType::f16: encode_f16(src, static_cast<uint16_t*>(dst), n); return;
    case DType::bf16: encode_bf16(src, static_cast<uint16_t*>(dst), n); return;
    case DType::q8_0: quantize_q8_0(src, static_cast<BlockQ8_0*>(dst), n / kQ8BlockSize); return;
    default: break;
  }
  std::fprintf(stderr, "mamba-ssm: convert: cannot write %s from f32\n", dtype_name(dtype));
  std::abort();
}

// Elements per parallel chunk of a conversion (a multiple of the q8_0 block).
constexpr int64_t kConvertChunk = 1 << 16;

}  // namespace

void matmul(const float* x, const void* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] = bias ? bias[n] : 0.0f;
    return;
  }
  switch (w_dtype) {
    case DType::f32: matmul_typed<DType::f32>(x, w, bias, y, M, N, K); return;
    case DType::f16: matmul_typed<DType::f16>(x, w, bias, y, M, N, K); return;
    case DType::bf16: matmul_typed<DType::bf16>(x, w, bias, y, M, N, K); return;
    case DType::q8_0:
      if (K % kQ8BlockSize != 0) {
        std::fprintf(stderr, "mamba-ssm: matmul: q8_0 weights need K %% 32 == 0 (K = %lld)\n", (long long)K);
        std::abort();
      }
      matmul_typed<DType::q8_0>(x, w, bias, y, M, N, K);
      return;
    default: break;
  }
  std::fprintf(stderr, "mamba-ssm: matmul: unsupported weight dtype %s\n", dtype_name(w_dtype));
  std::abort();
}

void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n) {
  if (n <= 0) return;
  if ((src_dtype == DType::q8_0 || dst_dtype == DType::q8_0) && n % kQ8BlockSize != 0) {
    std::fprintf(stderr, "mamba-ssm: convert: q8_0 needs a multiple of 32 elements (n = %lld)\n", (long long)n);
    std::abort();
  }
  if (src_dtype == dst_dtype) {
    std::memcpy(dst, src, dtype_bytes(src_dtype, n));
    return;
  }
  const uint8_t* in = static_cast<const uint8_t*>(src);
  uint8_t* out = static_cast<uint8_t*>(dst);
  const int64_t chunks = (n + kConvertChunk - 1) / kConvertChunk;
  parallel_for(chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * kConvertChunk, count = std::min(kConvertChunk, n - first);
      const void* from = in + dtype_bytes(src_dtype, first);
      void* to = out + dtype_bytes(dst_dtype, first);
      if (src_dtype == DType::f32) {
        encode_from_f32(static_cast<const float*>(from), dst_dtype, to, count);
      } else if (dst_dtype == DType::f32) {
        decode_to_f32(from, src_dtype, static_cast<float*>(to), count);
      } else {  // between two narrow dtypes, through f32
        float* wide = t_scratch.get(kConvertChunk);
        decode_to_f32(from, src_dtype, wide, count);
        encode_from_f32(wide, dst_dtype, to, count);
      }
    }
  });
}

}  // namespace mssm::cpu::MSSM_LEVEL
