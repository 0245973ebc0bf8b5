// gemm.cuh's launches on emulated blocks (emulated_block.h): every block of the grid builtin_gemm would
// launch for a product, the skinny kernel (with or without its 16-byte loads) or the tiled one, plain
// or grouped (M: the rows the grid is sized for; groups: blockIdx.z's extent).
#pragma once
#include <cstdint>

#include "cuda/gemm_block.h"
#include "emulated_block.h"
#include "test_util.h"

namespace mssm::test {

// builtin_gemm's choice: the skinny kernel below this many rows.
constexpr int64_t kEmulatedSkinnyMaxRows = 32;

template <typename T>
void emulated_gemm(EmulatedBlock& block, const char* what, bool skinny, bool vector, const float* x, int64_t ldx,
                   const T* W, const float* bias, float* y, int64_t ldy, int64_t M, int64_t N, int64_t K,
                   const cuda::gemm::GemmGroups& groups, int64_t group_count) {
  namespace g = cuda::gemm;
  const int64_t grid_x = skinny ? (N + g::kSkinnyWarps - 1) / g::kSkinnyWarps : (N + g::kTile - 1) / g::kTile;
  const int64_t grid_y = skinny ? 1 : (M + g::kTile - 1) / g::kTile;
  bool divergent = false;
  for (int64_t bz = 0; bz < group_count; ++bz)
    for (int64_t by = 0; by < grid_y; ++by)
      for (int64_t bx = 0; bx < grid_x; ++bx)
        divergent |= !block.run([&] {
          if (!skinny)
            g::gemm_tiled_block<T>(x, ldx, W, bias, y, ldy, M, N, K, groups, bx, by, bz, grid_y);
          else if (vector)
            g::gemm_skinny_block<T, true>(x, ldx, W, bias, y, ldy, M, N, K, groups, bx, bz);
          else
            g::gemm_skinny_block<T, false>(x, ldx, W, bias, y, ldy, M, N, K, groups, bx, bz);
        });
  MSSM_CHECK(!divergent, "%s: no divergent barrier", what);
}

}  // namespace mssm::test
