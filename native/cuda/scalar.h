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

// dt = clamp(softplus(v), lo, hi) (softplus(v) = v above 20; no softplus when `softplus` is false) and
// d dt / dv, 0 where clamped: native/train/dt_rule.h's rule.
MSSM_BLOCK_FN void train_step_rule(bool softplus, float lo, float hi, float v, float* dt, float* slope) {
  float value = v, grad = 1.0f;
  if (softplus && v <= 20.0f) {
    value = scalar::softplus(v);
    grad = 1.0f / (1.0f + expf(-v));
  }
  const bool clamped = value < lo || value > hi;
  *dt = fminf(fmaxf(value, lo), hi);
  *slope = clamped ? 0.0f : grad;
}


}  // namespace mssm::cuda::scalar
