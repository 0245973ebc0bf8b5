// STUB: replaced by the real kernels.
#include "level.h"
#include <cstdio>
#include <cstdlib>

namespace mssm::cpu::MSSM_LEVEL {
void matmul(const float* x, const void* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "matmul");
  std::abort();
}
void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "convert");
  std::abort();
}
}  // namespace mssm::cpu::MSSM_LEVEL
