// A scalar e^v that vectorises, shared by kernels that need many exponentials in plain loops.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace mssm {

// e^v to about 2 ulp for v in [-87, 88] (clamped there, so the result is finite and normal):
// v = n·ln2 + r with |r| ≤ ln2/2, then e^r by its Taylor series to r⁷ (the r⁸/8! term is below 6e-9
// relative) and 2^n put in the exponent bits. Branch-free so that loops over it vectorise.
// `static`: every file that includes it (the kernel files compiled once per CPU level among them)
// keeps its own copy, compiled with its own flags, so no level's code can stand in for another's.
static inline float exp_poly(float v) {
  v = std::min(88.0f, std::max(-87.0f, v));
  // Adding and subtracting 1.5·2^23 rounds to the nearest integer (valid for |v·log2e| < 2^22).
  const float n = (v * 1.44269504f + 12582912.0f) - 12582912.0f;
  // ln 2 split in two so that n · ln2_high is exact (ln2_high has 9 significant bits).
  const float r = (v - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t scale_bits = (uint32_t)((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  return p * scale;
}

}  // namespace mssm
