// Internal to the matmul sources (gemm.cpp: decode path, dispatch and conversions; gemm_prefill.cpp:
// the packed, register-blocked path for many rows of x): one SIMD register of floats per level, the
// readers of each weight dtype, and per-thread scratch. See gemm.cpp for the glossary of sizes.
#pragma once
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
namespace gemm_detail {

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
inline thread_local Scratch t_scratch;

// Below this much work (multiply-adds) a thread is not worth waking.
constexpr int64_t kMinWorkPerThread = 1 << 16;

// y[M,N] = x[M,K] · W[N,K]ᵀ (+ bias) for many rows of x (gemm_prefill.cpp).
void gemm_prefill(const float* x, const uint8_t* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N,
                  int64_t K);
// As gemm_prefill, for the many rows of a decode step (matmul_step): at the avx512bf16 level q8_0
// weights are rounded to bf16 and multiplied by x rounded to bf16; other dtypes as gemm_prefill.
void gemm_step(const float* x, const uint8_t* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N,
               int64_t K);

}  // namespace gemm_detail
}  // namespace mssm::cpu::MSSM_LEVEL
