// STUB: replaced by the real kernels.
#include "level.h"
#include <cstdio>
#include <cstdlib>

namespace mssm::cpu::MSSM_LEVEL {
void rmsnorm(const float* x, const float* residual, const float* weight, float* out, float* residual_out, int64_t rows,
             int64_t dim, float eps) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "rmsnorm");
  std::abort();
}
void gated_rmsnorm(const float* x, const float* z, const float* weight, float* out, int64_t rows, int64_t dim,
                   int64_t group_size, float eps, bool norm_before_gate) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "gated_rmsnorm");
  std::abort();
}
void embedding(const void* table, DType dtype, const int32_t* ids, float* out, int64_t count, int64_t dim) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "embedding");
  std::abort();
}
}  // namespace mssm::cpu::MSSM_LEVEL
