// A small test harness for the kernel tests: checks that count failures, seeded random inputs, error
// measures, and a loop over every CPU level this machine supports.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "../core/cpu_features.h"
#include "../core/dtype.h"
#include "../core/threadpool.h"
#include "../cpu/kernels.h"

namespace mssm::test {

inline int& failures() { static int n = 0; return n; }
inline int& checks() { static int n = 0; return n; }

#define MSSM_CHECK(cond, ...)                                                  \
  do {                                                                         \
    ++::mssm::test::checks();                                                  \
    if (!(cond)) {                                                             \
      ++::mssm::test::failures();                                              \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);     \
      std::fprintf(stderr, __VA_ARGS__);                                       \
      std::fprintf(stderr, "\n");                                              \
    }                                                                          \
  } while (0)

// Deterministic generator (splitmix64) so a failure reproduces.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }      // [0, 1)
  float uniform(float lo, float hi) { return lo + (hi - lo) * (float)uniform(); }
  float normal() {
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return (float)(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
  std::vector<float> normals(size_t n, float scale = 1.0f) {
    std::vector<float> v(n);
    for (auto& x : v) x = normal() * scale;
    return v;
  }
  std::vector<float> uniforms(size_t n, float lo, float hi) {
    std::vector<float> v(n);
    for (auto& x : v) x = uniform(lo, hi);
    return v;
  }
};

// Largest |a - b| / (|b| + atol_scale), with b the reference. atol_scale guards elements near zero:
// pass the typical magnitude of the output (e.g. its RMS) times a small factor, stated in the test.
struct ErrorStats {
  double max_rel = 0, max_abs = 0;
  int64_t worst = -1;
};
template <typename A, typename B>
inline ErrorStats compare(const A* got, const B* want, int64_t n, double floor) {
  ErrorStats e;
  for (int64_t i = 0; i < n; ++i) {
    double g = (double)got[i], w = (double)want[i];
    double abs = std::fabs(g - w);
    double rel = abs / (std::fabs(w) + floor);
    if (!(rel <= e.max_rel)) {  // NaN counts as worst
      e.max_rel = std::isnan(rel) ? INFINITY : rel;
      e.worst = i;
    }
    if (abs > e.max_abs) e.max_abs = abs;
  }
  return e;
}

template <typename T>
inline double rms(const T* v, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += (double)v[i] * (double)v[i];
  return n ? std::sqrt(s / n) : 0;
}

// For results whose inputs were rounded on purpose (activations rounded to bf16 or 8 bits): the
// error's RMS and its largest element, each as a fraction of the RMS of want, within the limits.
template <typename A, typename B>
inline void expect_rms_close(const char* what, const A* got, const B* want, int64_t n, double rms_limit,
                             double max_limit) {
  double err2 = 0, worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double e = (double)got[i] - (double)want[i];
    err2 += e * e;
    worst = std::isnan(e) ? INFINITY : std::max(worst, std::fabs(e));
    if (std::isnan(e)) break;
  }
  const double scale = rms(want, n) + 1e-30;
  const double rel_rms = n ? std::sqrt(err2 / n) / scale : 0, rel_max = worst / scale;
  MSSM_CHECK(rel_rms <= rms_limit && rel_max <= max_limit,
             "%s: error RMS %.3g and max %.3g of the values' RMS (limits %.3g, %.3g)", what, rel_rms, rel_max,
             rms_limit, max_limit);
}

// Asserts got ≈ want within rel (relative to |want| + floor); prints the worst element on failure.
template <typename A, typename B>
inline void expect_close(const char* what, const A* got, const B* want, int64_t n, double rel, double floor) {
  ErrorStats e = compare(got, want, n, floor);
  MSSM_CHECK(e.max_rel <= rel, "%s: max rel err %.3g > %.3g at %lld (got %.9g want %.9g)", what, e.max_rel, rel,
             (long long)e.worst, e.worst >= 0 ? (double)got[e.worst] : 0.0, e.worst >= 0 ? (double)want[e.worst] : 0.0);
}

// Runs body once per supported CPU level, and at 1 thread and at the default thread count.
inline void for_each_level(const std::function<void(const cpu::KernelTable&, const std::string& label)>& body) {
  int threads = default_num_threads();
  for (int l = 0; l < kCpuLevelCount; ++l) {
    const cpu::KernelTable* t = cpu::kernels_for((CpuLevel)l);
    if (!t) {
      std::printf("  (level %s not supported here: skipped)\n", cpu_level_name((CpuLevel)l));
      continue;
    }
    for (int n : {1, threads > 1 ? threads : 2}) {
      set_num_threads(n);
      body(*t, std::string(t->level) + "/t" + std::to_string(n));
    }
  }
  set_num_threads(threads);
}

inline int finish(const char* name) {
  std::printf("%s: %d checks, %d failed\n", name, checks(), failures());
  return failures() ? 1 : 0;
}

// ---- Weights in every dtype (test_gemm, test_gemm_prefill) ----------------------------------------

// GGUF's q8_0 written from its definition: d = amax / 127 (stored as fp16), q = roundf(x · (1/d)),
// with 1/d taken of the f32 d; an all-zero block gets d = 0 and q = 0.
inline std::vector<BlockQ8_0> quantize_reference(const float* v, int64_t n) {
  std::vector<BlockQ8_0> blocks(n / kQ8BlockSize);
  for (size_t b = 0; b < blocks.size(); ++b) {
    float amax = 0;
    for (int i = 0; i < kQ8BlockSize; ++i) amax = std::max(amax, std::fabs(v[b * kQ8BlockSize + i]));
    float d = amax / 127.0f;
    float inverse = d != 0.0f ? 1.0f / d : 0.0f;
    blocks[b].d = f32_to_f16(d);
    for (int i = 0; i < kQ8BlockSize; ++i) blocks[b].qs[i] = (int8_t)roundf(v[b * kQ8BlockSize + i] * inverse);
  }
  return blocks;
}

// Weights stored in a dtype, and the f32 values a reader of that dtype must see.
struct StoredWeights {
  std::vector<uint8_t> bytes;
  std::vector<float> values;
};

inline StoredWeights store(const std::vector<float>& w, DType dtype) {
  StoredWeights s;
  const int64_t n = (int64_t)w.size();
  s.bytes.resize(dtype_bytes(dtype, n));
  s.values.resize(n);
  if (dtype == DType::f32) {
    std::memcpy(s.bytes.data(), w.data(), n * 4);
    s.values = w;
  } else if (dtype == DType::f16 || dtype == DType::bf16) {
    uint16_t* h = (uint16_t*)s.bytes.data();
    for (int64_t i = 0; i < n; ++i) {
      h[i] = dtype == DType::f16 ? f32_to_f16(w[i]) : f32_to_bf16(w[i]);
      s.values[i] = dtype == DType::f16 ? f16_to_f32(h[i]) : bf16_to_f32(h[i]);
    }
  } else {
    std::vector<BlockQ8_0> blocks = quantize_reference(w.data(), n);
    std::memcpy(s.bytes.data(), blocks.data(), s.bytes.size());
    for (int64_t i = 0; i < n; ++i) {
      const BlockQ8_0& b = blocks[i / kQ8BlockSize];
      s.values[i] = (float)b.qs[i % kQ8BlockSize] * f16_to_f32(b.d);
    }
  }
  return s;
}

// ---- Mixture-of-experts references (cpu/kernels.h's equations, in double) ----------------------

// The experts' GLU activation.
inline double reference_activation(double a, cpu::Activation act) {
  switch (act) {
    case cpu::Activation::silu: return a / (1.0 + std::exp(-a));
    case cpu::Activation::gelu: return 0.5 * a * (1.0 + std::erf(a / std::sqrt(2.0)));
    case cpu::Activation::gelu_tanh:
      return 0.5 * a * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (a + 0.044715 * a * a * a)));
  }
  return a;
}

// A token's router scores from its logits: softmax or sigmoid.
inline std::vector<double> reference_scores(const std::vector<double>& logits, cpu::MoeScoring scoring) {
  std::vector<double> p(logits.size());
  if (scoring == cpu::MoeScoring::softmax) {
    const double m = *std::max_element(logits.begin(), logits.end());
    double z = 0;
    for (size_t e = 0; e < p.size(); ++e) z += p[e] = std::exp(logits[e] - m);
    for (double& v : p) v /= z;
  } else {
    for (size_t e = 0; e < p.size(); ++e) p[e] = 1.0 / (1.0 + std::exp(-logits[e]));
  }
  return p;
}

// The experts by descending score, ties lower index first: the first k are the chosen ones.
inline std::vector<int32_t> descending(const std::vector<double>& scores) {
  std::vector<int32_t> order(scores.size());
  for (size_t e = 0; e < order.size(); ++e) order[e] = (int32_t)e;
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return scores[a] > scores[b]; });
  return order;
}

}  // namespace mssm::test
