// RMSNorm (with the fused residual add of a pre-norm block), Mamba-2's grouped gated RMSNorm, and
// the embedding lookup.
//
// Glossary (shapes as in kernels.h):
//   rows        independent vectors (tokens);   dim  features per row
//   group_size  features normalised together by gated_rmsnorm (dim / group_size groups per row)
//   s           the vector being normalised: x, x + residual, or x ⊙ silu(z)
//   rmsnorm(s)  s / sqrt(mean(s²) + eps)
//
// These kernels are bound by memory, not arithmetic, so they are written as plain loops over fixed
// groups of kLanes floats that the compiler turns into SIMD registers at every level. Each group is
// first copied into a local array so that reading the inputs precedes writing the outputs: outputs
// may alias inputs (residual_out = x, out = x), and the vectoriser then needs no overlap checks.
#include "level.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "../core/exp_poly.h"
#include "../core/threadpool.h"
#include "simd.h"

namespace mssm::cpu::MSSM_LEVEL {
namespace {

constexpr int kLanes = 16;
// Squares are summed in fp32 lanes for blocks of kSumBlock values, and the block sums in double, so
// the rounding error of Σ s² stays near that of a kSumBlock / kLanes = 32-term sum whatever dim is.
constexpr int64_t kSumBlock = 512;
// Floats per parallel chunk below which a row loop stays on one thread.
constexpr int64_t kMinFloatsPerThread = 1 << 14;


inline float silu(float z) { return z / (1.0f + exp_poly(-z)); }

inline float inverse_rms(double sum_squares, int64_t count, float eps) {
  return (float)(1.0 / std::sqrt(sum_squares / (double)count + (double)eps));
}

// Σ v² over n values (kSumBlock-blocked as above).
double sum_squares(const float* v, int64_t n) {
  double total = 0;
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t end = std::min(n, b + kSumBlock);
    float lanes[kLanes] = {};
    int64_t i = b;
    for (; i + kLanes <= end; i += kLanes)
      for (int j = 0; j < kLanes; ++j) lanes[j] += v[i + j] * v[i + j];
    for (; i < end; ++i) lanes[0] += v[i] * v[i];
    float block = 0;
    for (int j = 0; j < kLanes; ++j) block += lanes[j];
    total += block;
  }
  return total;
}

// One row of rmsnorm. With a residual, s = x + residual is formed once: written to residual_out when
// that is given (and read back from it), else recomputed for the output pass.
void rmsnorm_row(const float* x, const float* residual, const float* weight, float* out, float* residual_out,
                 int64_t dim, float eps) {
  double total;
  const float* s = x;
  if (residual) {
    total = 0;
    for (int64_t b = 0; b < dim; b += kSumBlock) {
      const int64_t end = std::min(dim, b + kSumBlock);
      float lanes[kLanes] = {};
      int64_t i = b;
      for (; i + kLanes <= end; i += kLanes) {
        float sum[kLanes];
        for (int j = 0; j < kLanes; ++j) sum[j] = x[i + j] + residual[i + j];
        if (residual_out)
          for (int j = 0; j < kLanes; ++j) residual_out[i + j] = sum[j];
        for (int j = 0; j < kLanes; ++j) lanes[j] += sum[j] * sum[j];
      }
      for (; i < end; ++i) {
        const float sum = x[i] + residual[i];
        if (residual_out) residual_out[i] = sum;
        lanes[0] += sum * sum;
      }
      float block = 0;
      for (int j = 0; j < kLanes; ++j) block += lanes[j];
      total += block;
    }
    if (residual_out) s = residual_out;
  } else {
    total = sum_squares(x, dim);
  }
  const float scale = inverse_rms(total, dim, eps);
  const bool add = residual && !residual_out;
  int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes) {
    float value[kLanes];
    for (int j = 0; j < kLanes; ++j) value[j] = add ? s[i + j] + residual[i + j] : s[i + j];
    for (int j = 0; j < kLanes; ++j) value[j] = value[j] * scale * weight[i + j];
    for (int j = 0; j < kLanes; ++j) out[i + j] = value[j];
  }
  for (; i < dim; ++i) out[i] = (add ? s[i] + residual[i] : s[i]) * scale * weight[i];
}

// One group of gated_rmsnorm (n features).
void gated_group(const float* x, const float* z, const float* weight, float* out, int64_t n, float eps,
                 bool norm_before_gate) {
  if (!z || norm_before_gate) {
    // out = rmsnorm(x) · weight (⊙ silu(z))
    const float scale = inverse_rms(sum_squares(x, n), n, eps);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      float value[kLanes];
      for (int j = 0; j < kLanes; ++j) value[j] = x[i + j] * scale * weight[i + j];
      if (z)
        for (int j = 0; j < kLanes; ++j) value[j] *= silu(z[i + j]);
      for (int j = 0; j < kLanes; ++j) out[i + j] = value[j];
    }
    for (; i < n; ++i) out[i] = x[i] * scale * weight[i] * (z ? silu(z[i]) : 1.0f);
    return;
  }
  // out = rmsnorm(x ⊙ silu(z)) · weight: the gated values are stored in out, then scaled in place.
  // The gate is written with simd.h's vectors: as a plain loop around a scalar SiLU the compiler left
  // it scalar, 0.9 ns an element (Mamba-2's 512-token prefill spent 2–3% of its time here).
  double total = 0;
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t end = std::min(n, b + kSumBlock);
    simd::vec lanes = simd::vset(0.0f);
    int64_t i = b;
    for (; i + simd::kWidth <= end; i += simd::kWidth) {
      const simd::vec gated = simd::vmul(simd::vload(x + i), simd::vsilu(simd::vload(z + i)));
      simd::vstore(out + i, gated);
      lanes = simd::vfma(gated, gated, lanes);
    }
    float block = simd::vsum(lanes);
    for (; i < end; ++i) {
      const float gated = x[i] * silu(z[i]);
      out[i] = gated;
      block += gated * gated;
    }
    total += block;
  }
  const float scale = inverse_rms(total, n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = out[i] * scale * weight[i];
}

int64_t min_rows(int64_t floats_per_row) {
  return std::max<int64_t>(1, kMinFloatsPerThread / std::max<int64_t>(1, floats_per_row));
}

}  // namespace

void rmsnorm(const float* x, const float* residual, const float* weight, float* out, float* residual_out, int64_t rows,
             int64_t dim, float eps) {
  if (!residual) residual_out = nullptr;
  parallel_for(rows, min_rows(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t offset = r * dim;
      rmsnorm_row(x + offset, residual ? residual + offset : nullptr, weight, out + offset,
                  residual_out ? residual_out + offset : nullptr, dim, eps);
    }
  });
}

void gated_rmsnorm(const float* x, const float* z, const float* weight, float* out, int64_t rows, int64_t dim,
                   int64_t group_size, float eps, bool norm_before_gate) {
  if (group_size <= 0 || dim % group_size != 0) {
    std::fprintf(stderr, "mamba-ssm: gated_rmsnorm: group_size %lld does not divide dim %lld\n",
                 (long long)group_size, (long long)dim);
    std::abort();
  }
  const int64_t groups = dim / group_size;
  parallel_for(rows * groups, min_rows(group_size), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t offset = g * group_size;
      gated_group(x + offset, z ? z + offset : nullptr, weight + (g % groups) * group_size, out + offset, group_size,
                  eps, norm_before_gate);
    }
  });
}

void embedding(const void* table, DType dtype, const int32_t* ids, float* out, int64_t count, int64_t dim) {
  if (dtype != DType::f32 && dtype != DType::f16 && dtype != DType::bf16 && dtype != DType::q8_0) {
    std::fprintf(stderr, "mamba-ssm: embedding: unsupported table dtype %s\n", dtype_name(dtype));
    std::abort();
  }
  if (dtype == DType::q8_0 && dim % kQ8BlockSize != 0) {
    std::fprintf(stderr, "mamba-ssm: embedding: q8_0 tables need dim %% 32 == 0 (dim = %lld)\n", (long long)dim);
    std::abort();
  }
  const uint8_t* bytes = static_cast<const uint8_t*>(table);
  const int64_t row_bytes = dtype_bytes(dtype, dim);
  parallel_for(count, min_rows(dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) convert(bytes + ids[i] * row_bytes, dtype, out + i * dim, DType::f32, dim);
  });
}

}  // namespace mssm::cpu::MSSM_LEVEL
