// The prefill path of matmul (gemm_prefill.cpp) against naive double references, called directly at
// every CPU level so that every size runs through it whatever row count the decode path stops at.
//
// Two arithmetic paths are checked:
//  - f32 (every level; f32, f16, bf16 and q8_0 weights except bf16 at avx512bf16): the reference
//    reads the weights as dtype.h decodes them and x as given; tolerance of fp32 accumulation.
//  - bf16 × bf16 (bf16 weights at avx512bf16): x is rounded to bf16 by the kernel. Against a reference
//    that rounds x the same way (f32_to_bf16) the tolerance is again that of fp32 accumulation, which
//    pins the packing of pairs, odd K and the rounding mode down exactly; against the reference with
//    x as given, the error must stay within what rounding x costs (kBf16Input*Tolerance).
// Sizes are awkward on purpose: M not a multiple of the register tile, K odd (a k pair left half
// empty) and not a multiple of 16 or 32, N from 1 to several packed panels, with and without bias.
#include <cstring>

#include "../core/dtype.h"
#include "test_util.h"

using namespace mssm;
using namespace mssm::test;

namespace mssm::cpu {
using PrefillFn = void (*)(const float*, const uint8_t*, DType, const float*, float*, int64_t, int64_t, int64_t);
namespace baseline::gemm_detail {
void gemm_prefill(const float*, const uint8_t*, DType, const float*, float*, int64_t, int64_t, int64_t);
}
#if MSSM_HAVE_X86_LEVELS
namespace avx2::gemm_detail {
void gemm_prefill(const float*, const uint8_t*, DType, const float*, float*, int64_t, int64_t, int64_t);
}
namespace avx512::gemm_detail {
void gemm_prefill(const float*, const uint8_t*, DType, const float*, float*, int64_t, int64_t, int64_t);
}
namespace avx512bf16::gemm_detail {
void gemm_prefill(const float*, const uint8_t*, DType, const float*, float*, int64_t, int64_t, int64_t);
}
#endif
}  // namespace mssm::cpu

namespace {

cpu::PrefillFn prefill_of(const std::string& level) {
  if (level == "baseline") return &cpu::baseline::gemm_detail::gemm_prefill;
#if MSSM_HAVE_X86_LEVELS
  if (level == "avx2") return &cpu::avx2::gemm_detail::gemm_prefill;
  if (level == "avx512") return &cpu::avx512::gemm_detail::gemm_prefill;
  if (level == "avx512bf16") return &cpu::avx512bf16::gemm_detail::gemm_prefill;
#endif
  return nullptr;
}

// Whether this level multiplies bf16 weights by x rounded to bf16.
bool rounds_x(const std::string& level, DType dtype) { return dtype == DType::bf16 && level == "avx512bf16"; }

// Tolerance of fp32 accumulation, relative to |y| + RMS(y) (as test_gemm.cpp argues: the terms of a
// K-term dot product cancel, so near-zero elements are judged against the RMS).
constexpr double kAccumulationTolerance = 1e-5;
// Rounding x to bf16 (8 significant bits) changes each term by at most 2⁻⁸ of itself, about 1.6e-3 in
// RMS over uniformly spread mantissas; over K random terms the output moves by the same fraction of
// its RMS. Measured here: RMS(y − y_exact) = 1.5–1.7e-3 · RMS(y) over a thousand outputs or more (up
// to 2.6e-3 over 33), the largest element up to 9.6e-3 · RMS(y). Bounds, with x as given as the
// reference: the RMS of the error, and its largest element, both relative to RMS(y).
constexpr double kBf16InputRmsTolerance = 4e-3;
constexpr double kBf16InputMaxTolerance = 2e-2;

// y[m,n] = Σ_k x[m,k] · W[n,k] + bias[n], in double.
std::vector<double> reference(const std::vector<float>& x, const std::vector<float>& w, const float* bias, int64_t M,
                              int64_t N, int64_t K) {
  std::vector<double> y(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const float* xr = x.data() + m * K;
      const float* wr = w.data() + n * K;
      double sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += (double)xr[k] * (double)wr[k];
      y[m * N + n] = sum + (bias ? bias[n] : 0.0);
    }
  return y;
}

std::vector<float> rounded_to_bf16(const std::vector<float>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = bf16_to_f32(f32_to_bf16(v[i]));
  return r;
}

// RMS(got − want) / RMS(want) and max |got − want| / RMS(want).
struct RelativeError {
  double rms = 0, max = 0;
  bool within_bf16_input_bounds() const { return rms <= kBf16InputRmsTolerance && max <= kBf16InputMaxTolerance; }
};
template <typename A>
RelativeError error_over_rms(const A* got, const std::vector<double>& want) {
  const double scale = rms(want.data(), (int64_t)want.size());
  double sum = 0, worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double e = std::fabs((double)got[i] - want[i]) / scale;
    sum += e * e;
    worst = std::isnan(e) ? INFINITY : std::max(worst, e);
  }
  return {std::sqrt(sum / (double)want.size()), worst};
}

struct Shape {
  int64_t M, N, K;
};

void test_prefill() {
  // Every M in {9, 16, 17, 33, 100, 513}, N in {1, 17, 33, 100, 3072} and K odd, even, below and above
  // one packed panel (rows arrangement: 384 deep for f32, 768 for bf16; columns: 2048 and 4096), K = 1
  // and K = 48 (Mamba's dt_proj). Both arrangements: rows for most, columns (M ≤ 64 filling its
  // registers of rows, N large enough) for M = 9, 16, 25, 48, 57, 64 with the larger N, with tiles of
  // one, two and a partial second register of rows and a partial last strip of W. A tall x (2100 rows
  // of 300 features) splits its rows among the threads.
  const Shape shapes[] = {{9, 17, 1},      {16, 33, 3},     {17, 100, 47},  {33, 1, 771},    {100, 3072, 45},
                          {513, 17, 301},  {16, 3072, 385}, {33, 100, 1537}, {9, 3072, 33},   {100, 33, 769},
                          {513, 100, 48},  {17, 1, 2},      {48, 300, 771},  {57, 3072, 47},  {64, 113, 1537},
                          {25, 300, 2101}, {513, 3072, 771}, {2100, 300, 71}};
  const DType dtypes[] = {DType::f32, DType::f16, DType::bf16, DType::q8_0};
  Rng rng(2024);
  int shape_index = 0;
  for (const Shape& shape : shapes) {
    ++shape_index;
    const bool large = shape.M * shape.N * shape.K > 100000000;
    for (int d = 0; d < 4; ++d) {
      const DType dtype = dtypes[d];
      if (large && (dtype == DType::f16 || dtype == DType::q8_0)) continue;  // same path as f32, slow reference
      const int64_t M = shape.M, N = shape.N;
      const int64_t K = dtype == DType::q8_0 ? (shape.K + 31) / 32 * 32 : shape.K;
      const bool with_bias = (shape_index + d) % 2 == 0;  // each dtype with and without, shape by shape
      std::vector<float> x = rng.normals(M * K), w = rng.normals(N * K, 0.5f), bias = rng.normals(N);
      const float* b = with_bias ? bias.data() : nullptr;
      StoredWeights stored = store(w, dtype);
      std::vector<double> exact = reference(x, stored.values, b, M, N, K);
      std::vector<double> rounded;  // with x rounded to bf16, for the bf16 × bf16 path
      if (dtype == DType::bf16) rounded = reference(rounded_to_bf16(x), stored.values, b, M, N, K);

      char what[160];
      std::snprintf(what, sizeof what, "prefill %s M=%lld N=%lld K=%lld bias=%d", dtype_name(dtype), (long long)M,
                    (long long)N, (long long)K, (int)with_bias);
      for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
        cpu::PrefillFn prefill = prefill_of(t.level);
        MSSM_CHECK(prefill != nullptr, "no prefill entry for level %s", t.level);
        if (!prefill) return;
        std::vector<float> y(M * N, NAN);
        prefill(x.data(), stored.bytes.data(), dtype, b, y.data(), M, N, K);
        const std::string name = std::string(what) + " " + label;
        const std::vector<double>& want = rounds_x(t.level, dtype) ? rounded : exact;
        expect_close(name.c_str(), y.data(), want.data(), M * N, kAccumulationTolerance, rms(want.data(), M * N));
        if (rounds_x(t.level, dtype)) {
          const RelativeError e = error_over_rms(y.data(), exact);
          MSSM_CHECK(e.within_bf16_input_bounds(), "%s: error of bf16 x: RMS %.3g, largest %.3g of RMS(y)",
                     name.c_str(), e.rms, e.max);
        }

        // The public entry point agrees, whichever path it picks for this M (decode keeps x in f32).
        std::vector<float> via_matmul(M * N, NAN);
        t.matmul(x.data(), stored.bytes.data(), dtype, b, via_matmul.data(), M, N, K);
        if (rounds_x(t.level, dtype)) {
          MSSM_CHECK(error_over_rms(via_matmul.data(), exact).within_bf16_input_bounds(), "%s: matmul", name.c_str());
        } else {
          expect_close((name + " matmul").c_str(), via_matmul.data(), exact.data(), M * N, kAccumulationTolerance,
                       rms(exact.data(), M * N));
        }
      });
    }
  }
}

// The bf16 × bf16 checks fail on the mistakes that path could make: a K pair packed in the wrong
// order, the half-empty last pair of an odd K dropped or filled, x truncated instead of rounded.
void test_bf16_checks_catch_errors() {
  const int64_t M = 33, N = 100, K = 771;
  Rng rng(7);
  std::vector<float> x = rng.normals(M * K), w = rng.normals(N * K, 0.5f);
  StoredWeights stored = store(w, DType::bf16);
  const std::vector<float> xr = rounded_to_bf16(x);
  const std::vector<double> exact = reference(x, stored.values, nullptr, M, N, K);
  const std::vector<double> rounded = reference(xr, stored.values, nullptr, M, N, K);
  const double floor = rms(rounded.data(), M * N);

  auto caught = [&](const std::vector<double>& wrong) {
    return compare(wrong.data(), rounded.data(), M * N, floor).max_rel > kAccumulationTolerance;
  };
  // The pairs of k swapped: x[2p] meets W[2p+1].
  std::vector<float> swapped = xr;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k + 1 < K; k += 2) std::swap(swapped[m * K + k], swapped[m * K + k + 1]);
  MSSM_CHECK(caught(reference(swapped, stored.values, nullptr, M, N, K)), "swapped pairs are caught");
  // The last k dropped.
  std::vector<float> dropped = xr;
  for (int64_t m = 0; m < M; ++m) dropped[m * K + K - 1] = 0;
  const std::vector<double> without_last = reference(dropped, stored.values, nullptr, M, N, K);
  MSSM_CHECK(caught(without_last), "a dropped last k is caught");
  MSSM_CHECK(!error_over_rms(without_last.data(), exact).within_bf16_input_bounds(),
             "a dropped last k exceeds the bf16 input bounds too");
  // x truncated to bf16 instead of rounded.
  std::vector<float> truncated(x.size());
  for (size_t i = 0; i < x.size(); ++i) truncated[i] = bits_f32(f32_bits(x[i]) & 0xffff0000u);
  MSSM_CHECK(caught(reference(truncated, stored.values, nullptr, M, N, K)), "truncated x is caught");
  // And the true result, with x kept in f32, is far from the rounded reference: the check does see
  // which rounding the kernel did.
  MSSM_CHECK(caught(exact), "x left in f32 is told apart from x rounded to bf16");
  const RelativeError cost = error_over_rms(rounded.data(), exact);
  MSSM_CHECK(cost.rms > 1e-4 && cost.rms <= kBf16InputRmsTolerance / 2 && cost.max <= kBf16InputMaxTolerance / 2,
             "rounding x to bf16 costs RMS %.3g, largest %.3g of RMS(y): inside the bounds with room", cost.rms,
             cost.max);
  std::printf("  rounding x to bf16: RMS error %.3g, largest %.3g of RMS(y)\n", cost.rms, cost.max);
}

}  // namespace

int main() {
  test_prefill();
  test_bf16_checks_catch_errors();
  return finish("test_gemm_prefill");
}
