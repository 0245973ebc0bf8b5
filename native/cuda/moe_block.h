// The grouping kernel of moe.cu as block code on native/cuda/block.h's primitives, so that it also
// compiles without nvcc: a CPU test runs it on emulated blocks against a counting sort
// (native/tests/test_moe_blocks.cpp).
//
// Block e walks the tokens in order, kGroupThreads at a time, and ranks the pairs routed to e with a
// block-wide exclusive scan of each token's count of them. Count pass (place = false): offsets[e + 1]
// = the count. Place pass, once offsets holds the running sums: pair[offsets[e] + rank] = p and
// position[p] = offsets[e] + rank. So each expert's pairs keep the (token, slot) order, whatever the
// launch shape.
#pragma once
#include <cstdint>

#include "block.h"

namespace mssm::cuda::moe {

constexpr int kGroupThreads = 256;

MSSM_BLOCK_FN void group_block(const int32_t* indices, int64_t tokens, int64_t top_k, int64_t* offsets, int64_t* pair,
                               int64_t* position, bool place, int e) {
  const int lane = block::lane_id(), warp = block::warp_id();
  constexpr int kWarps = kGroupThreads / 32;
  MSSM_SHARED(long long[kWarps], warp_sums);
  MSSM_SHARED(long long, base);
  if (MSSM_RANK == 0) base = place ? offsets[e] : 0;
  MSSM_SYNC();
  for (int64_t t0 = 0; t0 < tokens; t0 += kGroupThreads) {
    const int64_t t = t0 + MSSM_RANK;
    long long c = 0;
    if (t < tokens)
      for (int64_t slot = 0; slot < top_k; ++slot) c += indices[t * top_k + slot] == e;
    long long incl = c;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const long long v = block::shuffle_up(incl, o);
      if (lane >= o) incl += v;
    }
    if (lane == 31) warp_sums[warp] = incl;
    MSSM_SYNC();
    if (warp == 0) {
      long long s = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const long long v = block::shuffle_up(s, o);
        if (lane >= o) s += v;
      }
      if (lane < kWarps) warp_sums[lane] = s;
    }
    MSSM_SYNC();
    const long long first = base + incl - c + (warp > 0 ? warp_sums[warp - 1] : 0);
    if (place && c > 0) {
      long long r = first;
      for (int64_t slot = 0; slot < top_k; ++slot) {
        const int64_t p = t * top_k + slot;
        if (indices[p] == e) {
          pair[r] = p;
          position[p] = r;
          ++r;
        }
      }
    }
    MSSM_SYNC();
    if (MSSM_RANK == kGroupThreads - 1) base = first + c;
    MSSM_SYNC();
  }
  if (!place && MSSM_RANK == 0) offsets[e + 1] = base;
}

}  // namespace mssm::cuda::moe
