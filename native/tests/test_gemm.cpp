// matmul and convert against naive references: every weight dtype, every CPU level, 1 and N threads.
//
// matmul's reference reads the weights exactly as the kernel must (dequantised with dtype.h's scalar
// functions) and accumulates in double, so the kernel is judged on fp32 accumulation alone. A second
// check measures what the dtype itself costs: the same reference with the original f32 weights.
#include <cstring>

#include "../core/dtype.h"
#include "test_util.h"

#if MSSM_HAVE_X86_LEVELS
// The int8-product form of q8_0 matmul (gemm.cpp), defined at the avx512bf16 level (VNNI).
namespace mssm::cpu::avx512bf16::gemm_detail {
void matmul_q8_0_int8(const float* x, const void* w, const float* bias, float* y, int64_t M, int64_t N, int64_t K);
}
#endif

using namespace mssm;
using namespace mssm::test;

namespace {

const DType kWeightTypes[] = {DType::f32, DType::f16, DType::bf16, DType::q8_0};

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

// Two forms change what is multiplied, both at the avx512bf16 level, and are judged by what that
// change costs rather than by the tolerance of fp32 accumulation:
//  - bf16 × bf16: bf16 weights with more rows of x than the decode path takes (gemm.cpp: 8 when
//    K < 256, else 6); the prefill path rounds x to bf16 (gemm_prefill.cpp, test_gemm_prefill.cpp).
//  - int8 × int8: q8_0 weights with the few rows of x of the decode path's direct form (up to 4, and
//    up to 8 when K < 256) through matmul_step, or through gemm_detail::matmul_q8_0_int8.
//    x is quantised too, per block of 32 with d = max|x| / 127, so y carries its rounding to 8 bits.
//  - bf16 × bf16 from q8_0: q8_0 weights with more rows than the decode path takes (12, or 8 when
//    K < 256) through matmul_step: each weight q·d and x rounded to bf16, so y carries both roundings.
// The error in y[m,n] is then Σ_k W[n,k]·δx[m,k], so it is judged relative to the size of the terms,
// s[m,n] = sqrt(Σ_k (x[m,k]·W[n,k])²) (for zero-mean inputs, the RMS of y without bias): the RMS over
// outputs of |error| / s (over 16 outputs or more; fewer say little about an RMS) and the largest.
// Measured over the shapes here, int8: RMS up to 7.6e-3, largest 3.2e-2; bf16: RMS up to 2.1e-3,
// largest 8.6e-3; bf16 w and x: RMS up to 3.0e-3, largest 1.1e-2. The bounds are 1.6–2.2× that.
enum class Products { f32, int8_x, bf16_x, bf16_wx };
constexpr double kInt8RmsBound = 1.2e-2, kInt8MaxBound = 5e-2;
constexpr double kBf16RmsBound = 4e-3, kBf16MaxBound = 1.6e-2;
constexpr double kBf16WxRmsBound = 6e-3, kBf16WxMaxBound = 2.4e-2;
// Below this the int8 form (or bf16 w and x) cannot have run (its error is that of 8-bit activations,
// or of bf16 weights and activations).
constexpr double kInt8MinRms = 1e-4;

// What matmul (step: matmul_step) multiplies at level t.
Products products(const cpu::KernelTable& t, DType dtype, int64_t M, int64_t K, bool step) {
  if (std::string(t.level) != "avx512bf16") return Products::f32;
  if (dtype == DType::bf16 && M > (K < 256 ? 8 : 6)) return Products::bf16_x;
  if (step && dtype == DType::q8_0 && M <= (K < 256 ? 8 : 4)) return Products::int8_x;
  if (step && dtype == DType::q8_0 && M > (K < 256 ? 8 : 12)) return Products::bf16_wx;
  return Products::f32;
}

// The two entry points, which differ only in what matmul_step's q8_0 products do with x.
struct MatmulForm {
  decltype(cpu::KernelTable::matmul) fn;
  bool step;
  const char* name;
};
std::vector<MatmulForm> matmul_forms(const cpu::KernelTable& t) {
  return {{t.matmul, false, "matmul"}, {t.matmul_step, true, "matmul_step"}};
}

// RMS and largest of |got − want| / s over the outputs, s as above.
std::pair<double, double> term_relative_errors(const float* got, const std::vector<double>& want,
                                               const std::vector<float>& x, const std::vector<float>& w, int64_t M,
                                               int64_t N, int64_t K) {
  double sum = 0, largest = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double terms = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double t = (double)x[m * K + k] * (double)w[n * K + k];
        terms += t * t;
      }
      const double e = std::fabs((double)got[m * N + n] - want[m * N + n]) / std::sqrt(terms);
      sum += e * e;
      largest = std::isnan(e) ? INFINITY : std::max(largest, e);
    }
  return {std::sqrt(sum / (M * N)), largest};
}

// Checks one matmul result against the double-precision reference of the weights as stored (x as
// given), for products of the given kind.
void check_matmul(const std::string& what, Products kind, const float* y, const std::vector<double>& want,
                  const std::vector<float>& x, const std::vector<float>& w, int64_t M, int64_t N, int64_t K) {
  if (kind == Products::f32) {
    expect_close(what.c_str(), y, want.data(), M * N, kMatmulTolerance, kFloorFraction * rms(want.data(), M * N));
    return;
  }
  const auto [rms_error, max_error] = term_relative_errors(y, want, x, w, M, N, K);
  const bool int8 = kind == Products::int8_x, wx = kind == Products::bf16_wx;
  const double rms_bound = int8 ? kInt8RmsBound : wx ? kBf16WxRmsBound : kBf16RmsBound;
  const double max_bound = int8 ? kInt8MaxBound : wx ? kBf16WxMaxBound : kBf16MaxBound;
  const char* name = int8 ? "int8" : wx ? "bf16 w and" : "bf16";
  MSSM_CHECK((rms_error <= rms_bound || M * N < 16) && max_error <= max_bound,
             "%s: %s x: RMS error %.3g (bound %.3g), largest %.3g (bound %.3g) of the terms' size", what.c_str(), name,
             rms_error, rms_bound, max_error, max_bound);
  // (Over 16 outputs or more: a single output's error may be near zero by chance.)
  if (int8 || wx)
    MSSM_CHECK(rms_error >= kInt8MinRms || M * N < 16, "%s: RMS error %.3g: the %s path did not run", what.c_str(),
               rms_error, name);
  if (std::getenv("MSSM_PRINT_ROUNDED_X"))
    std::printf("%s x %s: rms %.3g max %.3g\n", name, what.c_str(), rms_error, max_error);
}

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

      char what[160];
      std::snprintf(what, sizeof what, "%s M=%lld N=%lld K=%lld bias=%d", dtype_name(dtype), (long long)M,
                    (long long)N, (long long)K, (int)with_bias);
      for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
        for (const MatmulForm& f : matmul_forms(t)) {
          std::vector<float> y(M * N, NAN);
          f.fn(x.data(), stored.bytes.data(), dtype, b, y.data(), M, N, K);
          check_matmul(std::string(f.name) + " " + what + " " + label, products(t, dtype, M, K, f.step), y.data(), want,
                       x, stored.values, M, N, K);
        }
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

// The decode path (few rows of x) on every size class it handles differently: M on both sides of each
// register tile of rows of x and of the decode / prefill switch; N of 1, 3 and 17 (partial groups of
// output features and partial registers of lane sums) and one large enough to be split over threads;
// K not a multiple of 16 or 32 where the dtype allows (q8_0 needs K % 32 == 0), and one K shorter than a
// register. Every level at 1 and N threads, with and without bias, against the double-precision
// reference of the weights as stored; the tolerance is kMatmulTolerance (fp32 accumulation).
void test_matmul_decode_sizes() {
  const int64_t Ms[] = {1, 2, 3, 5, 7, 15, 16, 17, 31, 32, 33};
  const int64_t Ns[] = {1, 3, 17, 301};
  Rng rng(4321);
  int case_index = 0;
  for (DType dtype : kWeightTypes) {
    // (48 and 128: whole registers, at most 8, which one or two rows of x take in the short form.)
    const std::vector<int64_t> Ks = dtype == DType::q8_0 ? std::vector<int64_t>{32, 96, 416}
                                                          : std::vector<int64_t>{7, 45, 48, 128, 419};
    for (int64_t M : Ms)
      for (int64_t N : Ns)
        for (int64_t K : Ks) {
          const bool with_bias = ++case_index % 2 == 0;
          std::vector<float> x = rng.normals(M * K);
          std::vector<float> w = rng.normals(N * K, 0.5f);
          std::vector<float> bias = rng.normals(N);
          StoredWeights stored = store(w, dtype);
          const float* b = with_bias ? bias.data() : nullptr;
          std::vector<double> want = reference_matmul(x, stored.values, b, M, N, K);
          char what[160];
          std::snprintf(what, sizeof what, "%s M=%lld N=%lld K=%lld bias=%d", dtype_name(dtype), (long long)M,
                        (long long)N, (long long)K, (int)with_bias);
          for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
            for (const MatmulForm& f : matmul_forms(t)) {
              std::vector<float> y(M * N, NAN);
              f.fn(x.data(), stored.bytes.data(), dtype, b, y.data(), M, N, K);
              check_matmul(std::string(f.name) + " " + what + " " + label, products(t, dtype, M, K, f.step), y.data(),
                           want, x, stored.values, M, N, K);
            }
          });
        }
  }
  // Model-sized: an in_proj-like [3072 × 768] at M = 1 and 16 (split over threads by output features)
  // and an x_proj-like [80 × 1536] and dt_proj-like [1536 × 48].
  const Shape model_shapes[] = {{1, 3072, 768}, {16, 3072, 768}, {1, 80, 1536}, {16, 80, 1536}, {1, 1536, 48},
                                {16, 1536, 48}};
  for (const Shape& shape : model_shapes)
    for (DType dtype : kWeightTypes) {
      if (dtype == DType::q8_0 && shape.K % kQ8BlockSize != 0) continue;
      const int64_t M = shape.M, N = shape.N, K = shape.K;
      std::vector<float> x = rng.normals(M * K);
      std::vector<float> w = rng.normals(N * K, 0.5f);
      std::vector<float> bias = rng.normals(N);
      StoredWeights stored = store(w, dtype);
      std::vector<double> want = reference_matmul(x, stored.values, bias.data(), M, N, K);
      char what[160];
      std::snprintf(what, sizeof what, "%s M=%lld N=%lld K=%lld bias=1", dtype_name(dtype), (long long)M,
                    (long long)N, (long long)K);
      for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
        for (const MatmulForm& f : matmul_forms(t)) {
          std::vector<float> y(M * N, NAN);
          f.fn(x.data(), stored.bytes.data(), dtype, bias.data(), y.data(), M, N, K);
          check_matmul(std::string(f.name) + " " + what + " " + label, products(t, dtype, M, K, f.step), y.data(), want,
                       x, stored.values, M, N, K);
        }
      });
    }
}

// The decode path's direct form sums in the same order whatever the number of rows of x, so a row of
// x gets bit-identical results alone and in a batch, on every level (up to 4 rows of x, and up to 8
// when K < 256; the panel form beyond is not covered). K = 16, 48 and 128 are short rows, which one or
// two rows of x take through the short form and more rows through the general one.
void test_matmul_batch_invariance() {
  const int64_t N = 37;
  Rng rng(808);
  for (DType dtype : kWeightTypes)
    for (int64_t K : {16, 45, 48, 128, 419}) {
      const int64_t k = dtype == DType::q8_0 ? (K + 31) / 32 * 32 : K;
      const int64_t M = k < 256 ? 8 : 4;
      std::vector<float> x = rng.normals(M * k), w = rng.normals(N * k, 0.5f), bias = rng.normals(N);
      StoredWeights stored = store(w, dtype);
      for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
        for (const MatmulForm& f : matmul_forms(t)) {
          std::vector<float> batch(M * N), alone(N);
          f.fn(x.data(), stored.bytes.data(), dtype, bias.data(), batch.data(), M, N, k);
          int64_t differ = 0;
          for (int64_t m = 0; m < M; ++m) {
            f.fn(x.data() + m * k, stored.bytes.data(), dtype, bias.data(), alone.data(), 1, N, k);
            differ += std::memcmp(alone.data(), batch.data() + m * N, N * sizeof(float)) != 0;
          }
          MSSM_CHECK(differ == 0, "%s %s M=%lld K=%lld %s: %lld rows differ alone and in the batch", f.name,
                     dtype_name(dtype), (long long)M, (long long)k, label.c_str(), (long long)differ);
        }
      });
    }
}

// x holding a NaN or an infinity gives non-finite outputs in its row and only there, on every path; a
// block of subnormal x (which the int8 path must not overflow when quantising) and a block of zeros
// give ordinary results.
void test_matmul_special_inputs() {
  const int64_t N = 37, K = 128;
  Rng rng(555);
  for (DType dtype : kWeightTypes)
    for (int64_t M : {1, 3, 4, 7, 16}) {
      std::vector<float> x = rng.normals(M * K);
      std::vector<float> w = rng.normals(N * K, 0.5f);
      StoredWeights stored = store(w, dtype);
      for (int64_t k = 0; k < 32; ++k) x[k] = 3e-41f * (float)(k - 16);  // row 0, block 0: subnormals
      if (M > 1)
        for (int64_t k = 32; k < 64; ++k) x[K + k] = 0.0f;  // row 1, block 1: zeros
      const int64_t nan_row = M > 2 ? 2 : -1, inf_row = M > 3 ? 3 : -1;
      std::vector<double> want = reference_matmul(x, stored.values, nullptr, M, N, K);
      if (nan_row >= 0) x[nan_row * K + 77] = NAN;
      if (inf_row >= 0) x[inf_row * K + 5] = INFINITY;
      for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
       for (const MatmulForm& f : matmul_forms(t)) {
        std::vector<float> y(M * N, 0.0f);
        f.fn(x.data(), stored.bytes.data(), dtype, nullptr, y.data(), M, N, K);
        for (int64_t m = 0; m < M; ++m) {
          const bool special = m == nan_row || m == inf_row;
          int64_t finite = 0;
          for (int64_t n = 0; n < N; ++n) finite += std::isfinite(y[m * N + n]);
          MSSM_CHECK(finite == (special ? 0 : N), "%s %s M=%lld %s: row %lld has %lld finite outputs of %lld", f.name,
                     dtype_name(dtype), (long long)M, label.c_str(), (long long)m, (long long)finite, (long long)N);
          if (special) continue;
          std::vector<float> row(y.begin() + m * N, y.begin() + (m + 1) * N);
          std::vector<double> row_want(want.begin() + m * N, want.begin() + (m + 1) * N);
          std::vector<float> row_x(x.begin() + m * K, x.begin() + (m + 1) * K);
          char what[160];
          std::snprintf(what, sizeof what, "%s %s M=%lld row %lld %s", f.name, dtype_name(dtype), (long long)M,
                        (long long)m, label.c_str());
          check_matmul(what, products(t, dtype, M, K, f.step), row.data(), row_want, row_x, stored.values, 1, N, K);
        }
       }
      });
    }
}

// The int8-product form of q8_0 matmul, at the avx512bf16 level with 1 and N threads: the decode
// sizes (K a multiple of 32), model-sized shapes, rows of x bit-identical alone and in a batch, and a
// NaN or infinity in x reaching only the outputs of its row.
void test_matmul_q8_0_int8() {
#if MSSM_HAVE_X86_LEVELS
  if (!cpu::kernels_for(CpuLevel::avx512bf16)) {
    std::printf("  (level avx512bf16 not supported here: int8 products skipped)\n");
    return;
  }
  const auto int8 = &cpu::avx512bf16::gemm_detail::matmul_q8_0_int8;
  const int threads = default_num_threads();
  std::vector<Shape> shapes;
  for (int64_t M : {1, 2, 3, 5, 7, 15, 16, 17, 31, 32, 33})
    for (int64_t N : {1, 3, 17, 301})
      for (int64_t K : {32, 96, 416}) shapes.push_back({M, N, K});
  for (Shape model : {Shape{1, 3072, 768}, Shape{16, 3072, 768}, Shape{4, 80, 1536}}) shapes.push_back(model);
  Rng rng(2468);
  int case_index = 0;
  for (const Shape& shape : shapes) {
    const int64_t M = shape.M, N = shape.N, K = shape.K;
    const bool with_bias = ++case_index % 2 == 0;
    std::vector<float> x = rng.normals(M * K), w = rng.normals(N * K, 0.5f), bias = rng.normals(N);
    StoredWeights stored = store(w, DType::q8_0);
    const float* b = with_bias ? bias.data() : nullptr;
    std::vector<double> want = reference_matmul(x, stored.values, b, M, N, K);
    for (int n : {1, threads > 1 ? threads : 2}) {
      set_num_threads(n);
      std::vector<float> y(M * N, NAN);
      int8(x.data(), stored.bytes.data(), b, y.data(), M, N, K);
      char what[160];
      std::snprintf(what, sizeof what, "int8 products M=%lld N=%lld K=%lld bias=%d t%d", (long long)M, (long long)N,
                    (long long)K, (int)with_bias, n);
      check_matmul(what, Products::int8_x, y.data(), want, x, stored.values, M, N, K);
    }
  }
  set_num_threads(threads);

  {  // alone and in a batch
    const int64_t M = 8, N = 37, K = 160;
    std::vector<float> x = rng.normals(M * K), w = rng.normals(N * K, 0.5f), bias = rng.normals(N);
    StoredWeights stored = store(w, DType::q8_0);
    std::vector<float> batch(M * N), alone(N);
    int8(x.data(), stored.bytes.data(), bias.data(), batch.data(), M, N, K);
    int64_t differ = 0;
    for (int64_t m = 0; m < M; ++m) {
      int8(x.data() + m * K, stored.bytes.data(), bias.data(), alone.data(), 1, N, K);
      differ += std::memcmp(alone.data(), batch.data() + m * N, N * sizeof(float)) != 0;
    }
    MSSM_CHECK(differ == 0, "int8 products: %lld rows of 8 differ alone and in the batch", (long long)differ);
  }

  {  // non-finite x; a block of subnormals and one of zeros (which the quantiser must not overflow)
    const int64_t M = 4, N = 37, K = 128;
    std::vector<float> x = rng.normals(M * K), w = rng.normals(N * K, 0.5f);
    StoredWeights stored = store(w, DType::q8_0);
    for (int64_t k = 0; k < 32; ++k) x[k] = 3e-41f * (float)(k - 16);
    for (int64_t k = 32; k < 64; ++k) x[K + k] = 0.0f;
    std::vector<double> want = reference_matmul(x, stored.values, nullptr, M, N, K);
    x[2 * K + 77] = NAN;
    x[3 * K + 5] = INFINITY;
    std::vector<float> y(M * N);
    int8(x.data(), stored.bytes.data(), nullptr, y.data(), M, N, K);
    for (int64_t m = 0; m < M; ++m) {
      int64_t finite = 0;
      for (int64_t n = 0; n < N; ++n) finite += std::isfinite(y[m * N + n]);
      MSSM_CHECK(finite == (m >= 2 ? 0 : N), "int8 products: row %lld has %lld finite outputs of %lld", (long long)m,
                 (long long)finite, (long long)N);
    }
    std::vector<double> want_rows(want.begin(), want.begin() + 2 * N);
    std::vector<float> x_rows(x.begin(), x.begin() + 2 * K);
    check_matmul("int8 products, subnormal and zero blocks", Products::int8_x, y.data(), want_rows, x_rows,
                 stored.values, 2, N, K);
  }
#endif
}

// The bounds on rounded x can fail: an error of 1.5·kInt8RmsBound·s in every output, or of
// 1.2·kInt8MaxBound·s in one, is caught (the bf16 bounds are judged by the same measure).
void test_int8_check_catches_errors() {
  const int64_t M = 2, N = 40, K = 64;
  Rng rng(31);
  std::vector<float> x = rng.normals(M * K), w = rng.normals(N * K);
  std::vector<double> want = reference_matmul(x, w, nullptr, M, N, K);
  std::vector<double> s(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double terms = 0;
      for (int64_t k = 0; k < K; ++k) terms += std::pow((double)x[m * K + k] * w[n * K + k], 2);
      s[m * N + n] = std::sqrt(terms);
    }
  std::vector<float> y(M * N);
  for (int64_t i = 0; i < M * N; ++i) y[i] = (float)(want[i] + (i % 2 ? 1.5 : -1.5) * kInt8RmsBound * s[i]);
  MSSM_CHECK(term_relative_errors(y.data(), want, x, w, M, N, K).first > kInt8RmsBound, "an RMS error is caught");
  for (int64_t i = 0; i < M * N; ++i) y[i] = (float)want[i];
  y[7] = (float)(want[7] + 1.2 * kInt8MaxBound * s[7]);
  MSSM_CHECK(term_relative_errors(y.data(), want, x, w, M, N, K).second > kInt8MaxBound, "one large error is caught");
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
  test_matmul_decode_sizes();
  test_matmul_special_inputs();
  test_matmul_batch_invariance();
  test_matmul_q8_0_int8();
  test_matmul_check_catches_errors();
  test_int8_check_catches_errors();
  test_convert();
  return finish("test_gemm");
}
