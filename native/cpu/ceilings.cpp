// The machine's two ceilings, measured by the same code that runs the kernels: peak fp32 FMA
// throughput and read bandwidth. Benchmarks report every kernel as a fraction of one of them.
#include <vector>

#include "level.h"
#include "../core/threadpool.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mssm::cpu::MSSM_LEVEL {

// Independent FMA chains (enough to cover the FMA latency × ports) per thread; returns FLOPs done.
double fma_peak(int64_t iterations) {
  double total = 0;
  std::vector<double> per(num_threads(), 0.0);
  parallel_for(num_threads(), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
#if defined(__AVX512F__)
      __m512 acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(0.001f * (float)(i + 1));
      const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
      for (int64_t it = 0; it < iterations; ++it) {
        for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
      }
      __m512 s = acc[0];
      for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, acc[i]);
      per[t] = (double)_mm512_reduce_add_ps(s) * 0 + 2.0 * 16 * 12 * (double)iterations;
#elif defined(__AVX2__) && defined(__FMA__)
      __m256 acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(0.001f * (float)(i + 1));
      const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
      for (int64_t it = 0; it < iterations; ++it) {
        for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
      }
      __m256 s = acc[0];
      for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
      float lanes[8];
      _mm256_storeu_ps(lanes, s);
      per[t] = (double)lanes[0] * 0 + 2.0 * 8 * 12 * (double)iterations;
#else
      float acc[12][4];
      for (int i = 0; i < 12; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.001f * (float)(i + j + 1);
      for (int64_t it = 0; it < iterations; ++it) {
        for (int i = 0; i < 12; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = acc[i][j] * 0.999999f + 1e-7f;
      }
      float s = 0;
      for (int i = 0; i < 12; ++i)
        for (int j = 0; j < 4; ++j) s += acc[i][j];
      per[t] = (double)s * 0 + 2.0 * 4 * 12 * (double)iterations;
#endif
    }
  });
  for (double p : per) total += p;
  return total;
}

// As fma_peak with bf16 pair dot products (a lane adds a0·b0 + a1·b1: 4 FLOPs); 0 without them.
double bf16_peak(int64_t iterations) {
#if defined(__AVX512BF16__)
  std::vector<double> per(num_threads(), 0.0);
  parallel_for(num_threads(), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      __m512 acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(0.001f * (float)(i + 1));
      const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f7f), b = (__m512bh)_mm512_set1_epi16(0x3380);
      for (int64_t it = 0; it < iterations; ++it) {
        for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
      }
      __m512 s = acc[0];
      for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, acc[i]);
      per[t] = (double)_mm512_reduce_add_ps(s) * 0 + 4.0 * 16 * 12 * (double)iterations;
    }
  });
  double total = 0;
  for (double p : per) total += p;
  return total;
#else
  (void)iterations;
  return 0.0;
#endif
}

// Sums n floats split over the pool; the result is returned so the reads cannot be optimised away.
double read_sum(const float* data, int64_t n) {
  std::vector<double> per(num_threads(), 0.0);
  parallel_for(n, 1 << 16, [&](int64_t begin, int64_t end) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = begin;
    for (; i + 64 <= end; i += 64) {
      a0 = _mm512_add_ps(a0, _mm512_loadu_ps(data + i));
      a1 = _mm512_add_ps(a1, _mm512_loadu_ps(data + i + 16));
      a2 = _mm512_add_ps(a2, _mm512_loadu_ps(data + i + 32));
      a3 = _mm512_add_ps(a3, _mm512_loadu_ps(data + i + 48));
    }
    double s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = begin;
    for (; i + 8 <= end; i += 8)
      for (int j = 0; j < 8; ++j) acc[j] += data[i + j];
    double s = 0;
    for (float a : acc) s += a;
#endif
    for (; i < end; ++i) s += data[i];
    per[thread_index()] += s;
  });
  double total = 0;
  for (double p : per) total += p;
  return total;
}

}  // namespace mssm::cpu::MSSM_LEVEL
