// The device's chunked SSD backward (native/cuda/ssd_backward_block.h), run on the host: its four
// kernels' bodies, item by item and block by block, with each block's "shared memory" filled with NaN
// bytes first (so a value read before it is written poisons the result), against the CPU trainer's
// double backward (native/train/ssd_chunked.h, itself checked against finite differences in
// test_train_ssd). Each block runs first as one host thread doing the block's work in order, which
// checks the algorithm, the indexing, the tiling over state columns and the padding; then, on two
// small shapes, on the device's 256 threads emulated (emulated_block.h), which checks the barriers.
// test_cuda_scan_train runs the kernels on a GPU.
//
// Shapes: train_problems.h's SSD problems, each with the state held whole and split into tiles of 64,
// 32 and 16 columns (absent D or dt_bias: their (+=) gradients must come back untouched).
//
// Tolerances (‖got − want‖ / ‖want‖ per gradient, as test_train_ops): fp32 tiles 3e-5, the CPU's own
// float backward's limit against the double one in test_train_ssd; split bf16 tiles (hi + lo, 16 bits
// of each operand's mantissa, products in fp32) 1e-4.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/ssd_backward_block.h"
#include "emulated_block.h"
#include "train_problems.h"
#include "train/ssd_chunked.h"
#include "train_test_util.h"

using namespace mssm;
using namespace mssm::test;
namespace sb = mssm::cuda::ssd_backward;

namespace {

constexpr double kFp32Tolerance = 3e-5;
constexpr double kSplitBf16Tolerance = 1e-4;

using Shape = SsdTrainShape;

// Fills `bytes` with 0xff: NaN as float, double and bf16.
void poison(std::vector<double>& shared) { std::memset(shared.data(), 0xff, shared.size() * sizeof(double)); }

using Problem = SsdProblem;

// The four kernels of ssd_train.cu, in order, on the view ssd_train.cu makes (make_view), with tiles of
// T and state tiles of Nt columns; each block as one host thread (lanes = 0) or emulated on `lanes`.
template <typename T>
void run(const Problem& p, int Nt, double tolerance, const char* tiles, int lanes = 0) {
  const Shape& s = p.s;
  const int64_t BL = s.batch * s.length, H = s.heads, HP = H * s.head_dim, GN = s.groups * s.state;
  train::SsdTrainTensors<float> t;
  t.x = p.x.data(), t.dt = p.dt.data(), t.A = p.A.data(), t.B = p.B.data(), t.C = p.C.data();
  t.D = s.has_D ? p.D.data() : nullptr;
  t.dt_bias = s.has_bias ? p.bias.data() : nullptr;
  const FVec boundary = cast<float>(p.boundary);  // as the device's forward would have written it
  FVec dx = poisoned<float>(BL * HP), ddt = poisoned<float>(BL * H), dB(BL * GN, 0.0f), dC(BL * GN, 0.0f);
  FVec dA(p.dA0), dD(p.dD0), db(p.db0);
  train::SsdTrainGrads<float> g;
  g.dx = dx.data(), g.ddt = ddt.data(), g.dA = dA.data(), g.dB = dB.data(), g.dC = dC.data(), g.dD = dD.data();
  g.ddt_bias = db.data();
  // The workspace as ssd_train.cu lays it out, NaN bytes to start.
  const sb::Sizes z = sb::sizes_of(p.a);
  std::vector<double> work(sb::workspace_layout(sb::items_of(p.a), z.Qp, s.head_dim, s.state).total / 8 + 1);
  poison(work);
  const sb::View v = sb::make_view(p.a, t, boundary.data(), p.dy.data(), g, Nt, reinterpret_cast<char*>(work.data()));
  const int64_t items = v.items();

  const size_t bytes = std::max(sb::back_layout<T>(v.Qp, v.Pp, Nt).total, sb::dstate_layout<T>(v.Qp, v.Pp, Nt).total);
  std::vector<double> shared(bytes / sizeof(double) + 1);
  char* base = reinterpret_cast<char*>(shared.data());
  const std::string what = describe(s) + " " + tiles + " Nt" + std::to_string(Nt) +
                           (lanes ? " on " + std::to_string(lanes) + " lanes" : "");
  EmulatedBlock block(std::max(lanes, 1));
  auto launch = [&](auto body) {
    if (lanes == 0) return body();
    MSSM_CHECK(block.run(body), "%s: no divergent barrier", what.c_str());
  };
  for (int64_t item = 0; item < items; ++item) sb::prepare_item(v, item);
  for (int64_t item = 0; item < items; ++item) {
    poison(shared);
    launch([&] { sb::dstate_block<T>(v, item, base); });
  }
  for (int64_t i = 0; i < s.batch * H * v.P * v.N; ++i) sb::dstate_pass_element(v, i);
  for (int64_t item = 0; item < items; ++item) {
    poison(shared);
    launch([&] { sb::backward_block<T>(v, item, base); });
  }

  auto check = [&](const char* name, const FVec& got, const Vec& want) {
    const double err = norm_error(got.data(), want.data(), want.size());
    record(std::string(tiles) + " " + name, err);
    MSSM_CHECK(err <= tolerance, "%s %s: error %.3g vs the double backward (limit %.3g)", what.c_str(), name, err,
               tolerance);
  };
  check_ssd_gradients(p, dx, ddt, dA, dB, dC, dD, db, check);
}

}  // namespace

int main() {
  Rng rng(41);
  for (const Shape& s : ssd_train_shapes()) {
    const Problem p = make_ssd_problem(rng, s);
    const int Np = cuda::tiles::round16(s.state);
    for (int Nt : {Np, 64, 32, 16})
      if (Nt <= Np) run<float>(p, Nt, kFp32Tolerance, "fp32");
    run<cuda::tiles::HostBf16>(p, Np, kSplitBf16Tolerance, "split-bf16");
    run<cuda::tiles::HostBf16>(p, 16, kSplitBf16Tolerance, "split-bf16");
  }
  // The barriers: every block on the device's 256 threads, the state whole and in tiles.
  const Shape emulated[] = {
      {1, 40, 2, 5, 40, 1, 16, true, 0.0, INFINITY, true, true},
      {1, 70, 2, 16, 33, 2, 64, true, 0.0, INFINITY, true, false},
  };
  for (const Shape& s : emulated) {
    const Problem p = make_ssd_problem(rng, s);
    run<float>(p, cuda::tiles::round16(s.state), kFp32Tolerance, "fp32", cuda::tiles::kThreads);
    run<float>(p, 16, kFp32Tolerance, "fp32", cuda::tiles::kThreads);
  }
  for (const auto& [key, err] : worst()) std::printf("  worst %-22s %.3g\n", key.c_str(), err);
  return finish("test_ssd_backward_blocks");
}
