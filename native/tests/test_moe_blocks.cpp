// The device's grouping of mixture-of-experts pairs by expert (native/cuda/moe_block.h, the code of
// moe.cu's group kernel), run on the host: every expert's block emulated on the kernel's 256 lanes
// (emulated_block.h), the count pass, the prefix sums as moe.cu's prefix kernel makes them, then the
// place pass, against a counting sort written here: each expert's pairs in (token, slot) order, the
// offsets their running counts, position the inverse of pair, and pairs routed outside [0, E) left
// out (position -1). Shapes: 1 to 700 tokens (over several 256-token rounds), top_k 1 to 3, 1 to 9
// experts, routings that favour one expert, and indices of -1 and E.
#include <vector>

#include "cuda/moe_block.h"
#include "emulated_block.h"
#include "test_util.h"

using namespace mssm;
using namespace mssm::test;

int main() {
  Rng rng(5);
  EmulatedBlock block(cuda::moe::kGroupThreads);
  int cases = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t tokens = 1 + (int64_t)(rng.next() % (trial < 20 ? 40 : 700));
    const int64_t top_k = 1 + (int64_t)(rng.next() % 3), E = 1 + (int64_t)(rng.next() % 9), pairs = tokens * top_k;
    std::vector<int32_t> indices(pairs);
    for (auto& v : indices) {
      const uint64_t r = rng.next() % 100;
      v = r < 3 ? -1 : r < 6 ? (int32_t)E : r < 40 ? 0 : (int32_t)(rng.next() % E);  // expert 0 favoured
    }
    // The counting sort.
    std::vector<int64_t> want_offsets(E + 1, 0), want_pair, want_position(pairs, -1);
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t p = 0; p < pairs; ++p)
        if (indices[p] == e) want_position[p] = (int64_t)want_pair.size(), want_pair.push_back(p);
      want_offsets[e + 1] = (int64_t)want_pair.size();
    }
    std::vector<int64_t> offsets(E + 1, -7), pair(pairs, -7), position(pairs, -1);
    for (int e = 0; e < (int)E; ++e)
      MSSM_CHECK(block.run([&] { cuda::moe::group_block(indices.data(), tokens, top_k, offsets.data(), pair.data(),
                                                        position.data(), false, e); }),
                 "count pass: no divergent barrier");
    offsets[0] = 0;  // moe.cu's prefix kernel
    for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
    for (int e = 0; e < (int)E; ++e)
      MSSM_CHECK(block.run([&] { cuda::moe::group_block(indices.data(), tokens, top_k, offsets.data(), pair.data(),
                                                        position.data(), true, e); }),
                 "place pass: no divergent barrier");
    const int64_t placed = want_offsets[E];
    MSSM_CHECK(offsets == want_offsets, "trial %d (T %lld, k %lld, E %lld): offsets", trial, (long long)tokens,
               (long long)top_k, (long long)E);
    MSSM_CHECK(std::vector<int64_t>(pair.begin(), pair.begin() + placed) == want_pair, "trial %d: pairs", trial);
    MSSM_CHECK(position == want_position, "trial %d: positions", trial);
    ++cases;
  }
  std::printf("  %d routings grouped on emulated blocks of %d lanes\n", cases, cuda::moe::kGroupThreads);
  return finish("test_moe_blocks");
}
