// One SIMD vector of floats for the level being compiled (AVX-512: 16 lanes, AVX2+FMA: 8, baseline:
// 1), with the few operations the elementwise and scan kernels share, and a vectorised exp accurate to
// about one ulp. Included by per-level kernel sources only (it needs MSSM_LEVEL).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace mssm::cpu::MSSM_LEVEL::simd {

#if defined(__AVX512F__)
using vec = __m512;
constexpr int64_t kWidth = 16;
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vset(float x) { return _mm512_set1_ps(x); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
// exp(x) = 2^k · e^r with x = k·ln2 + r, |r| ≤ ln2/2; scalef gives subnormals, 0 and ∞ exactly.
inline vec vexp(vec x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-150.0f), x));
  vec k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  vec r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145752f), x);  // Cody–Waite: ln2 = hi + lo
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860682e-6f), r);
  vec p = _mm512_set1_ps(1.383684576e-3f);  // minimax fit of e^r on [-ln2/2, ln2/2], rel err 2e-9
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.374815807e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166822508e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666641980e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.999999106e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}
// 2^v as 2^floor(v) · 2^(j/16) · 2^f with v = floor(v) + j/16 + f, f ∈ [0, 1/16): the 16 values 2^(j/16)
// live in one register and are picked by a lane permute, which leaves a cubic for 2^f (minimax,
// relative error 1.2e-9). That is 4 multiply-adds and a scalef where the general exp of simd.h takes
// 9 and a scalef, and the multiply-add pipes are what the recurrence is bound by. Accuracy about
// 1 ulp, as vexp: the table entries are within 0.4 ulp, and 2^(j/16) + 2^(j/16)·f·q(f) rounds once.
// scalef applies 2^floor(v) and gives subnormals, 0 and ∞ exactly. v must be finite (callers bound
// it); no other range limit: for |v| ≥ 2^19, v is a whole number of sixteenths, f = 0, and scalef
// alone gives 0 or ∞.
struct Exp2 {
  vec entries, magic, c1, c2, c3;
  Exp2()
      : entries(_mm512_setr_ps(1.0f, 1.0442737341f, 1.0905077457f, 1.1387885809f, 1.1892070770f, 1.2418577671f,
                               1.2968395948f, 1.3542555571f, 1.4142135382f, 1.4768261909f, 1.5422108173f,
                               1.6104903221f, 1.6817928553f, 1.7562521696f, 1.8340080976f, 1.9152065516f)),
        magic(_mm512_set1_ps(786432.0f)),  // 1.5·2^19: its ulp is 1/16, so v + magic rounds v to sixteenths
        c1(_mm512_set1_ps(0.6931477785f)),
        c2(_mm512_set1_ps(0.2401790470f)),
        c3(_mm512_set1_ps(0.05671815947f)) {}

  vec operator()(vec v) const {
    // t = magic + (v rounded down to sixteenths); its low 4 mantissa bits are j. f = v minus the same
    // rounding, exactly (vreduceps).
    const vec t = _mm512_add_round_ps(v, magic, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const vec f = _mm512_reduce_ps(v, (4 << 4) | _MM_FROUND_TO_NEG_INF);
    const vec e = _mm512_permutexvar_ps(_mm512_castps_si512(t), entries);
    const vec q = _mm512_fmadd_ps(_mm512_fmadd_ps(c3, f, c2), f, c1);  // 2^f = 1 + f·q(f)
    // floor(v) of scalef equals the integer part of t - magic: sixteenths never cross an integer.
    return _mm512_scalef_ps(_mm512_fmadd_ps(_mm512_mul_ps(f, e), q, e), v);
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
using vec = __m256;
constexpr int64_t kWidth = 8;
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vset(float x) { return _mm256_set1_ps(x); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
// As the AVX-512 exp; 2^k is applied as two normal factors 2^(k/2)·2^(k-k/2) so that results in the
// subnormal range (x < -87.3) stay accurate and very negative x gives 0.
inline vec vexp(vec x) {
  x = _mm256_min_ps(_mm256_set1_ps(89.0f), _mm256_max_ps(_mm256_set1_ps(-150.0f), x));
  vec k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vec r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.42860682e-6f), r);
  vec p = _mm256_set1_ps(1.383684576e-3f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.374815807e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166822508e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666641980e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.999999106e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  __m256i ki = _mm256_cvtps_epi32(k);
  __m256i half = _mm256_srai_epi32(ki, 1);
  __m256i rest = _mm256_sub_epi32(ki, half);
  vec scale1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  vec scale2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, scale1), scale2);
}
#else
using vec = float;
constexpr int64_t kWidth = 1;
inline vec vload(const float* p) { return *p; }
inline void vstore(float* p, vec v) { *p = v; }
inline vec vset(float x) { return x; }
inline vec vadd(vec a, vec b) { return a + b; }
inline vec vmul(vec a, vec b) { return a * b; }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline vec vdiv(vec a, vec b) { return a / b; }
inline vec vexp(vec x) { return std::exp(x); }
#endif

// Sums of a vector's lanes, and loads/stores of the first n lanes (1 ≤ n ≤ kWidth) for row tails.
#if defined(__AVX512F__)
using mask = __mmask16;
inline vec vzero() { return _mm512_setzero_ps(); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
inline mask tail_mask(int64_t n) { return (mask)((1u << n) - 1u); }
inline vec vload_tail(const float* p, mask m) { return _mm512_maskz_loadu_ps(m, p); }
inline void vstore_tail(float* p, vec v, mask m) { _mm512_mask_storeu_ps(p, m, v); }
#elif defined(__AVX2__) && defined(__FMA__)
using mask = __m256i;
inline vec vzero() { return _mm256_setzero_ps(); }
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline mask tail_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vec vload_tail(const float* p, mask m) { return _mm256_maskload_ps(p, m); }
inline void vstore_tail(float* p, vec v, mask m) { _mm256_maskstore_ps(p, m, v); }
#else
inline float vsum(vec v) { return v; }
#endif

// dst[c·ld_dst + r] = src[r·ld_src + c] for r < rows, c < cols (16 × 16 register blocks with AVX-512).
inline void transpose(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
#if defined(__AVX512F__)
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, cols - c0);
      const mask col_mask = tail_mask(nc), row_mask = tail_mask(nr);
      vec v[16];
      for (int i = 0; i < 16; ++i) v[i] = i < nr ? vload_tail(src + (r0 + i) * ld_src + c0, col_mask) : vzero();
      // 16×16 transpose: interleave pairs of rows, then pairs of pairs, then 128-bit lanes twice.
      vec t[16];
      for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
      }
      for (int i = 0; i < 4; ++i) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        v[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        v[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        v[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        v[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
      }
      for (int i = 0; i < 2; ++i)
        for (int k = 0; k < 4; ++k) {
          t[8 * i + k] = _mm512_shuffle_f32x4(v[8 * i + k], v[8 * i + 4 + k], 0x88);
          t[8 * i + 4 + k] = _mm512_shuffle_f32x4(v[8 * i + k], v[8 * i + 4 + k], 0xdd);
        }
      for (int k = 0; k < 8; ++k) {
        v[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
        v[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xdd);
      }
      for (int i = 0; i < nc; ++i) vstore_tail(dst + (c0 + i) * ld_dst + r0, v[i], row_mask);
    }
  }
#else
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
#endif
}

// silu(v) = v · sigmoid(v); exp(-v) overflowing to ∞ for v < -89 gives the right limit (-0).
inline vec vsilu(vec v) { return vdiv(v, vadd(vset(1.0f), vexp(vmul(v, vset(-1.0f))))); }

}  // namespace mssm::cpu::MSSM_LEVEL::simd
