// The block emulation the kernel-body tests run on (emulated_block.h over native/cuda/block.h): that
// it catches what it is for, a read of another lane's write with no barrier between (NaN in one of
// the orders) and a barrier some lanes skip, and passes what is right: the same with the barrier,
// warp shuffles (xor and up, against their definitions), and a warp that shuffles alone while the
// other warps wait at the block's barrier; that a shuffle with lanes missing is caught; and that
// block-shared variables start every run as NaN.
#include <algorithm>
#include <cmath>
#include <vector>

#include "emulated_block.h"
#include "test_util.h"

using namespace mssm;
using namespace mssm::test;
namespace block = mssm::cuda::block;

int main() {
  for (bool with_barrier : {false, true}) {
    std::vector<float> shared(64, NAN), seen(64, 0.0f);
    EmulatedBlock b(64);
    MSSM_CHECK(b.run([&] {
      const int r = MSSM_RANK;
      shared[r] = (float)r;
      if (with_barrier) MSSM_SYNC();
      seen[r] = shared[(r + 1) % 64];
      MSSM_SYNC();
      seen[r] += shared[(r + 63) % 64];
    }), "no divergent barrier");
    const bool any_nan = std::any_of(seen.begin(), seen.end(), [](float v) { return std::isnan(v); });
    MSSM_CHECK(any_nan != with_barrier, "a missing barrier %s", with_barrier ? "is not reported" : "is caught");
  }
  {
    EmulatedBlock b(8);
    MSSM_CHECK(!b.run([] {
      if (MSSM_RANK % 2) return;
      MSSM_SYNC();
    }), "a divergent barrier is caught");
  }
  {
    // A shuffle in a warp some of whose lanes have returned, or in a block of a partial warp.
    EmulatedBlock partly_gone(32), partial(40);
    MSSM_CHECK(!partly_gone.run([] {
      if (MSSM_RANK == 3) return;
      (void)block::shuffle_xor(MSSM_RANK, 1);
    }), "a shuffle with a returned lane is caught");
    MSSM_CHECK(!partial.run([] { (void)block::shuffle_up(MSSM_RANK, 1); }), "a shuffle in a partial warp is caught");
  }
  {
    // Shared variables start as NaN in every run, also when an earlier run wrote them.
    std::vector<float> seen(4);
    EmulatedBlock b(4);
    for (int run = 0; run < 2; ++run) {
      MSSM_CHECK(b.run([&] {
        MSSM_SHARED(float[4], cells);
        seen[MSSM_RANK] = cells[MSSM_RANK];  // read before any write: NaN
        cells[MSSM_RANK] = 1.0f;
      }), "shared: no divergent barrier");
      MSSM_CHECK(std::all_of(seen.begin(), seen.end(), [](float v) { return std::isnan(v); }),
                 "shared variables start as NaN (run %d)", run);
    }
  }
  {
    // Shuffles in every warp of 96 lanes, then in warp 1 alone while the others wait at the barrier.
    std::vector<long long> xor_got(96), up_got(96), alone(96, -1);
    EmulatedBlock b(96);
    MSSM_CHECK(b.run([&] {
      const int r = MSSM_RANK;
      xor_got[r] = block::shuffle_xor((long long)r * 7, 5);
      up_got[r] = (long long)block::shuffle_up((double)r, 3);
      if (r / 32 == 1) {
        double s = r;
        for (int o = 1; o < 32; o <<= 1) {  // an inclusive scan across the warp
          const double y = block::shuffle_up(s, o);
          if (r % 32 >= o) s += y;
        }
        alone[r] = (long long)s;
      }
      MSSM_SYNC();
    }), "shuffles: no divergent barrier");
    int bad = 0;
    for (int r = 0; r < 96; ++r) {
      const int lane = r % 32, base = r - lane;
      bad += xor_got[r] != (long long)(base + (lane ^ 5)) * 7;
      bad += up_got[r] != (lane >= 3 ? r - 3 : r);
      long long scan = -1;
      if (r / 32 == 1) {
        scan = 0;
        for (int q = base; q <= r; ++q) scan += q;
      }
      bad += alone[r] != scan;
    }
    MSSM_CHECK(bad == 0, "shuffles give their definitions (%d wrong)", bad);
  }
  return finish("test_emulated_block");
}
