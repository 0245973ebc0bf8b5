// The device's own GEMM blocks (native/cuda/gemm_block.h, the code of gemm.cuh's kernels), run on the
// host: every block of each launch grid emulated on the kernel's 256 lanes (emulated_block.h), W as
// float and as bf16 (block::HostBf16), the skinny kernel with and without its 16-byte loads, against a
// naive product in double on the same weight values. Plain products of 1 to 130 rows and 1 to 100
// features (sizes off the tiles and the warp), and grouped ones as the mixture-of-experts block makes
// them: per-group weights and biases, an empty group, and a group with more rows than the grid was
// sized for (the tiled kernel then loops over row tiles). Tolerance: 1e-5 of |want| + RMS(want), fp32
// sums in another order.
#include <cmath>
#include <string>
#include <vector>

#include "cuda/gemm_block.h"
#include "emulated_gemm.h"
#include "test_util.h"

using namespace mssm;
using namespace mssm::test;
namespace g = mssm::cuda::gemm;
using cuda::block::HostBf16;

namespace {

template <typename T>
T from_float(float v);
template <>
float from_float<float>(float v) { return v; }
template <>
HostBf16 from_float<HostBf16>(float v) { return cuda::block::to_bf16(v); }

struct Problem {
  int64_t M, N, K, groups;  // M: the rows the grid is sized for; groups 0: a plain product
  std::vector<int64_t> offsets;
};

template <typename T>
void run(Rng& rng, const Problem& pr, const char* kernel, bool vector, EmulatedBlock& block) {
  const int64_t N = pr.N, K = pr.K, G = std::max<int64_t>(1, pr.groups);
  const int64_t rows = pr.groups ? pr.offsets[G] : pr.M;
  const std::vector<float> x = rng.normals(rows * K), bias = rng.normals(G * N), w_f = rng.normals(G * N * K);
  std::vector<T> W(w_f.size());
  for (size_t i = 0; i < W.size(); ++i) W[i] = from_float<T>(w_f[i]);
  // The reference, on the weights' stored values.
  std::vector<double> want(rows * N);
  for (int64_t e = 0; e < G; ++e) {
    const int64_t r0 = pr.groups ? pr.offsets[e] : 0, r1 = pr.groups ? pr.offsets[e + 1] : rows;
    for (int64_t m = r0; m < r1; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = bias[e * N + n];
        for (int64_t k = 0; k < K; ++k) s += (double)x[m * K + k] * g::to_f32(W[(e * N + n) * K + k]);
        want[m * N + n] = s;
      }
  }
  std::vector<float> y(rows * N, NAN);
  g::GemmGroups groups;
  if (pr.groups) groups = g::GemmGroups{pr.offsets.data(), N * K, N};
  const std::string what = std::string(kernel) + (vector ? " (16-byte loads) " : " ") + (sizeof(T) == 4 ? "f32" : "bf16") +
                           " M " + std::to_string(pr.M) + " N " + std::to_string(N) + " K " + std::to_string(K) +
                           " groups " + std::to_string(pr.groups);
  emulated_gemm<T>(block, what.c_str(), std::string(kernel) == "skinny", vector, x.data(), K, W.data(), bias.data(),
                   y.data(), N, pr.M, N, K, groups, G);
  expect_close(what.c_str(), y.data(), want.data(), (int64_t)want.size(), 1e-5, rms(want.data(), (int64_t)want.size()));
}

}  // namespace

int main() {
  Rng rng(23);
  EmulatedBlock block(256);
  int products = 0;
  const Problem problems[] = {
      {1, 17, 48, 0, {}},  {5, 100, 40, 0, {}},  {31, 64, 16, 0, {}},   {33, 70, 48, 0, {}},
      {64, 1, 96, 0, {}},  {130, 65, 24, 0, {}}, {8, 24, 32, 3, {0, 0, 19, 25}},  // group 1: 19 rows past the 8
      {40, 72, 32, 4, {0, 7, 7, 77, 90}},                                         // group 2: 70 rows, 1 row tile sized
  };
  for (const Problem& p : problems) {
    const bool tiled = p.M >= 32;
    for (int bf16 = 0; bf16 < 2; ++bf16) {
      if (tiled) {
        if (bf16) run<HostBf16>(rng, p, "tiled", false, block);
        else run<float>(rng, p, "tiled", false, block);
        ++products;
        continue;
      }
      for (bool vector : {false, true}) {
        if (vector && p.K % (bf16 ? 8 : 4)) continue;
        if (bf16) run<HostBf16>(rng, p, "skinny", vector, block);
        else run<float>(rng, p, "skinny", vector, block);
        ++products;
      }
    }
  }
  // Both kernels on each grouped problem (the runner picks by the rows the grid is sized for).
  for (const Problem& p : {problems[6], problems[7]}) {
    run<float>(rng, p, p.M >= 32 ? "skinny" : "tiled", false, block);
    run<HostBf16>(rng, p, p.M >= 32 ? "skinny" : "tiled", false, block);
    products += 2;
  }
  std::printf("  %d products on emulated blocks of 256 lanes\n", products);
  return finish("test_gemm_blocks");
}
