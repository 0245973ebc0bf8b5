// The device's recurrent training scans (native/cuda/scan_train_block.h, the code of scan_train.cu's
// kernels), run on the host: every block of the launch emulated on the kernel's 256 lanes, eight warps
// of one (sequence, channel) each (emulated_block.h, which switches lanes at every warp shuffle and
// __syncwarp in orders that expose a missing barrier), the forward then the backward, for the plain
// selective scan and for Mamba-2's SSD in its layout, against the CPU trainer's double forward and
// backward on train_problems.h's problems (those small enough to emulate in seconds). Tolerances as test_cuda_scan_train's: y and the boundary
// states 1e-5 of |want| + RMS(want); gradients 1e-4 in the norm measure of test_train_ops.
#include <string>
#include <vector>

#include "cuda/scan_train_block.h"
#include "emulated_block.h"
#include "train_problems.h"

using namespace mssm;
using namespace mssm::test;
namespace st = mssm::cuda::scan_train;

namespace {

void expect_grad(const std::string& what, const FVec& got, const Vec& want) {
  const double err = norm_error(got.data(), want.data(), want.size());
  MSSM_CHECK(err <= 1e-4, "%s: error %.3g vs the double backward (limit 1e-4)", what.c_str(), err);
}

void expect_forward(const std::string& what, const FVec& y, const Vec& want_y, const FVec& boundary,
                    const Vec& want_boundary) {
  expect_close((what + " y").c_str(), y.data(), want_y.data(), (int64_t)want_y.size(), 1e-5,
               rms(want_y.data(), (int64_t)want_y.size()));
  expect_close((what + " boundary").c_str(), boundary.data(), want_boundary.data(), (int64_t)want_boundary.size(), 1e-5,
               rms(want_boundary.data(), (int64_t)want_boundary.size()) + 1e-30);
}

// The forward and the backward launches of scan_train.cu, block by block.
template <bool kSsd>
void run(const std::string& what, const st::ScanView& v, const st::TrainTensors& t, FVec& y, FVec& boundary,
         const float* dy, const st::TrainGrads& g, EmulatedBlock& block) {
  const int64_t blocks = (v.batch * v.channels + st::kWarpsPerBlock - 1) / st::kWarpsPerBlock;
  FVec states = poisoned<float>(v.batch * v.channels * std::min(v.chunk, v.length) * v.state);
  bool divergent = false;
  st::with_layout(v.state, [&](auto J) {
    constexpr int kJ = decltype(J)::value;
    for (int64_t b = 0; b < blocks; ++b)
      divergent |= !block.run([&] { st::scan_forward_block<kJ, kSsd>(v, t, y.data(), boundary.data(), b); });
    for (int64_t b = 0; b < blocks; ++b)
      divergent |= !block.run([&] { st::scan_backward_block<kJ, kSsd>(v, t, boundary.data(), dy, g, states.data(), b); });
  });
  MSSM_CHECK(!divergent, "%s: no divergent barrier", what.c_str());
}

void scan(Rng& rng, const ScanTrainShape& s, EmulatedBlock& block) {
  const ScanProblem p = make_scan_problem(rng, s);
  const int64_t BLD = s.batch * s.length * s.channels, BLGN = s.batch * s.length * s.groups * s.state;
  const st::ScanView v{s.batch, s.length, s.channels, s.state, s.groups, s.chunk, (s.length + s.chunk - 1) / s.chunk,
                       s.softplus, (float)s.dt_min, (float)s.dt_max, 0};
  const st::TrainTensors t{p.u.data(), p.delta.data(), p.A.data(), p.B.data(), p.C.data(),
                           s.has_D ? p.D.data() : nullptr, s.has_z ? p.z.data() : nullptr,
                           s.has_bias ? p.bias.data() : nullptr};
  FVec y = poisoned<float>(BLD), boundary = poisoned<float>(p.boundary.size());
  FVec du = poisoned<float>(BLD), ddelta = poisoned<float>(BLD), dz = poisoned<float>(BLD);
  FVec dB(BLGN, 0.0f), dC(BLGN, 0.0f), dA(p.dA0), dD(p.dD0), db(p.db0);  // dB, dC: atomic sums, zeroed first
  const st::TrainGrads g{du.data(), ddelta.data(), dA.data(), dB.data(), dC.data(), s.has_D ? dD.data() : nullptr,
                         s.has_z ? dz.data() : nullptr, s.has_bias ? db.data() : nullptr};
  const std::string what = "scan " + describe(s);
  run<false>(what, v, t, y, boundary, p.dy.data(), g, block);
  expect_forward(what, y, p.y, boundary, p.boundary);
  check_scan_gradients(p, du, ddelta, dA, dB, dC, dD, dz, db,
                       [&](const char* name, const FVec& got, const Vec& want) {
                         expect_grad(what + " " + name, got, want);
                       });
}

void ssd(Rng& rng, const SsdTrainShape& s, EmulatedBlock& block) {
  const SsdProblem p = make_ssd_problem(rng, s);
  const int64_t BL = s.batch * s.length, H = s.heads, HP = H * s.head_dim, GN = s.groups * s.state;
  // The SSD as the scan over its expanded channels (scan_train.cu's ssd_train_*).
  const st::ScanView v{s.batch, s.length, HP, s.state, s.groups, s.chunk, (s.length + s.chunk - 1) / s.chunk,
                       s.softplus, (float)s.dt_min, (float)s.dt_max, s.head_dim};
  const st::TrainTensors t{p.x.data(), p.dt.data(), p.A.data(), p.B.data(), p.C.data(),
                           s.has_D ? p.D.data() : nullptr, nullptr, s.has_bias ? p.bias.data() : nullptr};
  FVec y = poisoned<float>(BL * HP), boundary = poisoned<float>(p.boundary.size()), dx = poisoned<float>(BL * HP);
  FVec ddt(BL * H, 0.0f), dB(BL * GN, 0.0f), dC(BL * GN, 0.0f), dA(p.dA0), dD(p.dD0), db(p.db0);  // ddt summed too
  const st::TrainGrads g{dx.data(), ddt.data(), dA.data(), dB.data(), dC.data(), s.has_D ? dD.data() : nullptr,
                         nullptr, s.has_bias ? db.data() : nullptr};
  const std::string what = "ssd (recurrent) " + describe(s);
  run<true>(what, v, t, y, boundary, p.dy.data(), g, block);
  expect_forward(what, y, p.y, boundary, p.boundary);
  check_ssd_gradients(p, dx, ddt, dA, dB, dC, dD, db,
                      [&](const char* name, const FVec& got, const Vec& want) {
                        expect_grad(what + " " + name, got, want);
                      });
}

}  // namespace

int main() {
  Rng rng(31);
  EmulatedBlock block(32 * st::kWarpsPerBlock);
  // The emulation switches lanes at every warp sum, a few per token and channel: the problems of up to
  // kBudget (sequence, token, channel) triples keep the test to seconds and still cover every register
  // layout (J = 1, 2, 4, 8) in both layouts; the larger ones run on a GPU in test_cuda_scan_train.
  constexpr int64_t kBudget = 6500;
  int run_count = 0;
  for (const ScanTrainShape& s : scan_train_shapes())
    if (s.batch * s.length * s.channels <= kBudget) scan(rng, s, block), ++run_count;
  for (const SsdTrainShape& s : ssd_train_shapes())
    if (s.batch * s.length * s.heads * s.head_dim <= kBudget) ssd(rng, s, block), ++run_count;
  std::printf("  %d of %zu problems on emulated blocks\n", run_count, scan_train_shapes().size() + ssd_train_shapes().size());
  return finish("test_scan_train_blocks");
}
