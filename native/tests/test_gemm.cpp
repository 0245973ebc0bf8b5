// matmul and convert against naive references: every weight dtype, every CPU level, 1 and N threads.
//
// matmul's reference reads the weights exactly as the kernel must (dequantised with dtype.h's scalar
// functions) and accumulates in double, so the kernel is judged on fp32 accumulation alone. A second
// check measures what the dtype itself costs: the same reference with the original f32 weights.
#include <cstring>

#include "../core/dtype.h"
#include "test_util.h"

using namespace mssm;
using namespace mssm::test;

namespace {

const DType kWeightTypes[] = {DType::f32, DType::f16, DType::bf16, DType::q8_0};

// GGUF's q8_0 written from its definition: d = amax / 127 (stored as fp16), q = roundf(x · (1/d)),
// with 1/d taken of the f32 d; an all-zero block gets d = 0 and q = 0.
std::vector<BlockQ8_0> quantize_reference(const float* v, int64_t n) {
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

StoredWeights store(const std::vector<float>& w, DType dtype) {
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

// y[m,n] = Σ_k x[m,k] · W[n,k] + bias[n], in double.
std::vector<double> reference_matmul(const std::vector<float>& x, const std::vector<float>& w, const float* bias,
                                     int64_t M, int64_t N, int64_t K) {
  std::vector<double> y(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double sum = bias ? bias[n] : 0.0;
      for (int64_t k = 0; k < K; ++k) sum += (double)x[m * K + k] * (double)w[n * K + k];
      y[m * N + n] = sum;
    }
  return y;
}

// Tolerance of fp32 accumulation: 1e-5 relative to max(|y|, RMS(y)). The floor at RMS(y) is needed
// because the terms of a K-term fp32 dot product cancel: its absolute error is set by the size of the
// terms, not of the result. Measured here (K ≤ 4096, every level): at most 2e-6·RMS(y), and a plain
// sequential fp32 loop reaches 1e-5·RMS(y), so near-zero elements are judged against RMS(y).
constexpr double kMatmulTolerance = 1e-5;
constexpr double kFloorFraction = 1.0;

// What the storage dtype costs, as RMS(y_dtype − y_f32) / RMS(y_f32) for normal weights and inputs:
// q8_0 rounds to ±d/2 with d = amax/127 (measured 0.43–0.54%); bf16 keeps 8 significant bits
// (0.15–0.22%); f16 keeps 11 (0.019–0.023%). The bounds are about twice the worst measured.
double quantisation_bound(DType dtype) {
  switch (dtype) {
    case DType::q8_0: return 1e-2;
    case DType::bf16: return 4e-3;
    case DType::f16: return 5e-4;
    default: return 0;
  }
}

struct Shape {
  int64_t M, N, K;
};

void test_matmul() {
  // Odd N and K, none a multiple of 16 or 32 (q8_0 rounds K up to a multiple of 32); M on both sides of
  // the decode / prefill switch; one shape large enough for several K panels and N blocks, one with
  // many rows and few outputs (split over rows of x), K = 1.
  const Shape shapes[] = {{1, 37, 45},   {2, 37, 45},   {3, 129, 301}, {5, 129, 301}, {17, 37, 45},
                          {67, 129, 301}, {1, 1100, 600}, {4, 1100, 600}, {67, 1100, 600}, {200, 40, 33},
                          {3, 5, 1},     {9, 3, 1},     {1, 1, 1}};
  Rng rng(1234);
  int case_index = 0;
  for (const Shape& shape : shapes) {
    for (DType dtype : kWeightTypes) {
      const int64_t M = shape.M, N = shape.N;
      const int64_t K = dtype == DType::q8_0 ? (shape.K + 31) / 32 * 32 : shape.K;
      const bool with_bias = ++case_index % 2 == 0;
      std::vector<float> x = rng.normals(M * K);
      std::vector<float> w = rng.normals(N * K, 0.5f);
      std::vector<float> bias = rng.normals(N);
      StoredWeights stored = store(w, dtype);
      const float* b = with_bias ? bias.data() : nullptr;
      std::vector<double> want = reference_matmul(x, stored.values, b, M, N, K);
      const double floor = kFloorFraction * rms(want.data(), M * N);

      char what[160];
      std::snprintf(what, sizeof what, "matmul %s M=%lld N=%lld K=%lld bias=%d", dtype_name(dtype), (long long)M,
                    (long long)N, (long long)K, (int)with_bias);
      for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
        std::vector<float> y(M * N, NAN);
        t.matmul(x.data(), stored.bytes.data(), dtype, b, y.data(), M, N, K);
        expect_close((std::string(what) + " " + label).c_str(), y.data(), want.data(), M * N, kMatmulTolerance,
                     floor);
      });

      if (dtype != DType::f32 && K >= 32) {
        std::vector<double> exact = reference_matmul(x, w, b, M, N, K);
        std::vector<double> error(M * N);
        for (int64_t i = 0; i < M * N; ++i) error[i] = want[i] - exact[i];
        const double relative = rms(error.data(), M * N) / rms(exact.data(), M * N);
        MSSM_CHECK(relative <= quantisation_bound(dtype) && relative > 0, "%s: quantisation error %.3g (bound %.3g)",
                   what, relative, quantisation_bound(dtype));
      }
    }
  }
}

// The comparison above can fail: small errors in one element of a real result are caught.
void test_matmul_check_catches_errors() {
  const int64_t M = 5, N = 37, K = 45;
  Rng rng(99);
  std::vector<float> x = rng.normals(M * K), w = rng.normals(N * K);
  std::vector<double> want = reference_matmul(x, w, nullptr, M, N, K);
  std::vector<float> y(M * N);
  cpu::kernels().matmul(x.data(), w.data(), DType::f32, nullptr, y.data(), M, N, K);
  const double floor = kFloorFraction * rms(want.data(), M * N);
  MSSM_CHECK(compare(y.data(), want.data(), M * N, floor).max_rel <= kMatmulTolerance, "unperturbed result passes");
  int64_t largest = 0;
  for (int64_t i = 0; i < M * N; ++i)
    if (std::fabs(want[i]) > std::fabs(want[largest])) largest = i;
  std::vector<float> wrong = y;
  wrong[largest] = (float)(want[largest] * (1 + 3e-5));
  MSSM_CHECK(compare(wrong.data(), want.data(), M * N, floor).max_rel > kMatmulTolerance, "a 3e-5 error is caught");
  // Near zero, an absolute error of 2e-5·RMS(y) is caught too.
  int64_t smallest = 0;
  for (int64_t i = 0; i < M * N; ++i)
    if (std::fabs(want[i]) < std::fabs(want[smallest])) smallest = i;
  wrong = y;
  wrong[smallest] = (float)(want[smallest] + 2e-5 * floor);
  MSSM_CHECK(compare(wrong.data(), want.data(), M * N, floor).max_rel > kMatmulTolerance,
             "a 2e-5·RMS error near zero is caught");
}

// ---- convert -------------------------------------------------------------------------------------

// Floats of every class: random bit patterns (all exponents, subnormals, infinities, NaNs), values at
// the f16 overflow and subnormal edges, and exact midpoints between neighbouring halves (the ties).
std::vector<float> awkward_floats(Rng& rng, int64_t n) {
  std::vector<float> v(n);
  const float specials[] = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f, 1e-8f, 2.9802322e-08f,
                            5.9604645e-08f, 6.1035156e-05f, 1e-40f, INFINITY, -INFINITY, NAN, 3.4e38f};
  for (int64_t i = 0; i < n; ++i) {
    switch (i % 3) {
      case 0: v[i] = bits_f32((uint32_t)rng.next()); break;
      case 1: {
        uint16_t h = (uint16_t)(rng.next() & 0x7bfe);  // finite, below the largest half
        double mid = ((double)f16_to_f32(h) + (double)f16_to_f32((uint16_t)(h + 1))) / 2;
        v[i] = (float)((rng.next() & 1) ? -mid : mid);
        break;
      }
      default: v[i] = (i / 3) % 8 == 0 ? specials[(i / 24) % (sizeof specials / sizeof *specials)]
                                       : rng.normal() * std::pow(10.0f, rng.uniform(-6.0f, 5.0f));
    }
  }
  return v;
}

void test_convert() {
  Rng rng(77);
  // Odd lengths (not a multiple of 8/16), and one that spans several parallel chunks.
  for (int64_t n : {int64_t(1), int64_t(4099), int64_t(3 * 65536 + 77)}) {
    std::vector<float> src = awkward_floats(rng, n);
    std::vector<uint16_t> want_f16(n), want_bf16(n);
    for (int64_t i = 0; i < n; ++i) {
      want_f16[i] = f32_to_f16(src[i]);
      want_bf16[i] = f32_to_bf16(src[i]);
    }
    for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
      std::vector<uint16_t> half(n), brain(n);
      t.convert(src.data(), DType::f32, half.data(), DType::f16, n);
      t.convert(src.data(), DType::f32, brain.data(), DType::bf16, n);
      int64_t bad_f16 = 0, bad_bf16 = 0;
      for (int64_t i = 0; i < n; ++i) {
        bad_f16 += half[i] != want_f16[i];
        bad_bf16 += brain[i] != want_bf16[i];
      }
      MSSM_CHECK(bad_f16 == 0, "%s n=%lld: %lld f32->f16 differ from f32_to_f16", label.c_str(), (long long)n,
                 (long long)bad_f16);
      MSSM_CHECK(bad_bf16 == 0, "%s n=%lld: %lld f32->bf16 differ from f32_to_bf16", label.c_str(), (long long)n,
                 (long long)bad_bf16);
    });
  }

  // Every half and every bf16 pattern back to f32: bit for bit, except that a NaN only has to stay a
  // NaN (F16C quiets signalling NaNs).
  std::vector<uint16_t> all(65536);
  for (int i = 0; i < 65536; ++i) all[i] = (uint16_t)i;
  for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
    std::vector<float> from_f16(65536), from_bf16(65536);
    t.convert(all.data(), DType::f16, from_f16.data(), DType::f32, 65536);
    t.convert(all.data(), DType::bf16, from_bf16.data(), DType::f32, 65536);
    int bad_f16 = 0, bad_bf16 = 0;
    for (int i = 0; i < 65536; ++i) {
      float want = f16_to_f32((uint16_t)i);
      bad_f16 += std::isnan(want) ? !std::isnan(from_f16[i]) : f32_bits(from_f16[i]) != f32_bits(want);
      bad_bf16 += f32_bits(from_bf16[i]) != f32_bits(bf16_to_f32((uint16_t)i));
    }
    MSSM_CHECK(bad_f16 == 0, "%s: %d halves read wrongly", label.c_str(), bad_f16);
    MSSM_CHECK(bad_bf16 == 0, "%s: %d bf16 values read wrongly", label.c_str(), bad_bf16);
  });

  // q8_0: bytes equal to the reference quantiser, and dequantisation equal to q · f16_to_f32(d).
  // Blocks at scales from 1e-6 to 1e4, an all-zero block, a block with one non-zero value, and blocks
  // of values on the rounding ties (integers + 0.5 times a power of two).
  for (int64_t blocks : {int64_t(1), int64_t(37), int64_t(2 * 65536 / 32 + 5)}) {
    const int64_t n = blocks * kQ8BlockSize;
    std::vector<float> src(n);
    for (int64_t b = 0; b < blocks; ++b) {
      float* v = src.data() + b * kQ8BlockSize;
      const float scale = std::pow(10.0f, rng.uniform(-6.0f, 4.0f));
      for (int i = 0; i < kQ8BlockSize; ++i) v[i] = rng.normal() * scale;
      if (b % 11 == 3) std::fill(v, v + kQ8BlockSize, 0.0f);
      if (b % 11 == 5) { std::fill(v, v + kQ8BlockSize, 0.0f); v[7] = -scale; }
      if (b % 11 == 7)
        for (int i = 0; i < kQ8BlockSize; ++i) v[i] = (float)((int)(rng.next() % 255) - 127 + 0.5) * 0.25f;
    }
    std::vector<BlockQ8_0> want = quantize_reference(src.data(), n);
    for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
      std::vector<BlockQ8_0> got(blocks);
      t.convert(src.data(), DType::f32, got.data(), DType::q8_0, n);
      MSSM_CHECK(std::memcmp(got.data(), want.data(), blocks * sizeof(BlockQ8_0)) == 0,
                 "%s blocks=%lld: q8_0 bytes differ from the reference quantiser", label.c_str(), (long long)blocks);
      std::vector<float> back(n);
      t.convert(want.data(), DType::q8_0, back.data(), DType::f32, n);
      int64_t bad = 0;
      for (int64_t i = 0; i < n; ++i) {
        const BlockQ8_0& blk = want[i / kQ8BlockSize];
        bad += f32_bits(back[i]) != f32_bits((float)blk.qs[i % kQ8BlockSize] * f16_to_f32(blk.d));
      }
      MSSM_CHECK(bad == 0, "%s blocks=%lld: %lld q8_0 values dequantised wrongly", label.c_str(), (long long)blocks,
                 (long long)bad);
    });
  }

  // Same-dtype copies, and narrow-to-narrow through f32.
  {
    const int64_t n = 1000 * 32 + 0;
    std::vector<float> src = rng.normals(n);
    std::vector<uint16_t> half(n);
    for (int64_t i = 0; i < n; ++i) half[i] = f32_to_f16(src[i]);
    std::vector<BlockQ8_0> q = quantize_reference(src.data(), n);
    for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
      std::vector<uint16_t> copy(n), brain(n);
      t.convert(half.data(), DType::f16, copy.data(), DType::f16, n);
      MSSM_CHECK(copy == half, "%s: f16 copy", label.c_str());
      std::vector<float> fcopy(n);
      t.convert(src.data(), DType::f32, fcopy.data(), DType::f32, n);
      MSSM_CHECK(fcopy == src, "%s: f32 copy", label.c_str());
      std::vector<BlockQ8_0> qcopy(n / 32);
      t.convert(q.data(), DType::q8_0, qcopy.data(), DType::q8_0, n);
      MSSM_CHECK(std::memcmp(qcopy.data(), q.data(), q.size() * sizeof(BlockQ8_0)) == 0, "%s: q8_0 copy", label.c_str());
      t.convert(half.data(), DType::f16, brain.data(), DType::bf16, n);
      int64_t bad = 0;
      for (int64_t i = 0; i < n; ++i) bad += brain[i] != f32_to_bf16(f16_to_f32(half[i]));
      MSSM_CHECK(bad == 0, "%s: %lld f16->bf16 values differ", label.c_str(), (long long)bad);
    });
  }
}

}  // namespace

int main() {
  test_matmul();
  test_matmul_check_catches_errors();
  test_convert();
  return finish("test_gemm");
}
