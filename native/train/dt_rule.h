// The step rule shared by the selective scan (ops.cpp) and the chunked SSD (ssd_chunked.cpp):
// dt = clamp(softplus(v), dt_min, dt_max) with v = Δ + bias (softplus optional, and taken as v for
// v > 20, as Mamba's reference kernels do), and its derivative d dt / dv. One definition for both
// ops, so that the SSD's dt is the scan's to the bit.
//
// Included by per-level kernel sources only (it needs MSSM_LEVEL): everything here lives in
// mssm::train::MSSM_LEVEL, so each level keeps its own copy, compiled with its own flags.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../core/exp_poly.h"

#ifndef MSSM_LEVEL
#error "MSSM_LEVEL must be defined (baseline, avx2, avx512 or avx512bf16) when compiling a kernel source"
#endif

namespace mssm::train::MSSM_LEVEL {

// softplus(v) for v ≤ 20 and its derivative σ(v), branch-free so that a row of them vectorises:
// with e = exp(−|v|) ∈ (0, 1], softplus = max(v, 0) + log1p(e) and log1p(e) = 2·atanh(s) = 2s·(1 + x·q(x)),
// s = e / (2 + e), x = s², q the minimax quartic of native/cpu/selective_scan.cpp (relative error
// below 3e-10, far under float rounding). T = double uses the library functions.
inline void softplus_and_sigmoid(float v, float* value, float* slope) {
  const float e = exp_poly(-std::fabs(v));
  const float s = e / (2.0f + e), x = s * s;
  float q = 0.1220460832f * x + 0.1070559844f;
  q = q * x + 0.1430843920f;
  q = q * x + 0.1999947727f;
  q = q * x + 0.3333333731f;
  *value = std::max(v, 0.0f) + 2.0f * s * (1.0f + x * q);
  const float r = 1.0f / (1.0f + e);
  *slope = v >= 0.0f ? r : e * r;
}
inline void softplus_and_sigmoid(double v, double* value, double* slope) {
  *value = std::log1p(std::exp(v));
  *slope = 1.0 / (1.0 + std::exp(-v));
}

// dt from v = Δ + bias, and d dt / dv (0 where clamped; 1 on softplus's v > 20 branch). Branch-free
// but for the softplus flag, which row() tests once outside its loop, so that a row of 16 vectorises.
template <typename T>
struct DtRule {
  bool softplus;
  T lo, hi;
  // One value.
  void operator()(T v, T* dt, T* grad) const {
    if (softplus)
      softplus_step(v, dt, grad);
    else
      clamp(v, T(1), dt, grad);
  }
  // `count` neighbouring channels of one token (bias: zeros when there is none).
  void row(const T* delta, const T* bias, int64_t count, T* dt, T* grad) const {
    if (softplus) {
      for (int64_t j = 0; j < count; ++j) softplus_step(delta[j] + bias[j], dt + j, grad + j);
    } else {
      for (int64_t j = 0; j < count; ++j) clamp(delta[j] + bias[j], T(1), dt + j, grad + j);
    }
  }
  void softplus_step(T v, T* dt, T* grad) const {
    T sp, sg;
    softplus_and_sigmoid(v, &sp, &sg);
    clamp(v > T(20) ? v : sp, v > T(20) ? T(1) : sg, dt, grad);
  }
  void clamp(T value, T slope, T* dt, T* grad) const {
    const bool clamped = (value < lo) | (value > hi);
    *dt = value < lo ? lo : (value > hi ? hi : value);
    *grad = clamped ? T(0) : slope;
  }
};

}  // namespace mssm::train::MSSM_LEVEL
