// The scalar functions of the model equations in the form the CPU kernels use, for device code and for
// block code that also compiles without nvcc (block.h).
#pragma once
#include <cmath>
#include <cstdint>

#include "block.h"

namespace mssm::cuda::scalar {

// softplus(v) = log(1 + e^v), and v itself above 20 (kernels.h).
MSSM_BLOCK_FN float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }
// silu(v) = v · sigmoid(v); expf(-v) = ∞ for v < -88 gives the right limit (-0).
MSSM_BLOCK_FN float silu(float v) { return v / (1.0f + expf(-v)); }

MSSM_HD inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace mssm::cuda::scalar
