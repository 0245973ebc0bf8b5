// STUB: replaced by the real kernels.
#include "level.h"
#include <cstdio>
#include <cstdlib>

namespace mssm::cpu::MSSM_LEVEL {
void conv1d(const float* x, const float* w, const float* bias, const float* state_in, float* state_out, float* y,
            int64_t batch, int64_t length, int64_t channels, int64_t kernel, bool silu) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "conv1d");
  std::abort();
}
void conv1d_step(const float* x, const float* w, const float* bias, float* state, float* y, int64_t batch,
                 int64_t channels, int64_t kernel, bool silu) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "conv1d_step");
  std::abort();
}
}  // namespace mssm::cpu::MSSM_LEVEL
