// STUB: replaced by the real kernels.
#include "level.h"
#include <cstdio>
#include <cstdlib>

namespace mssm::cpu::MSSM_LEVEL {
void argmax(const float* logits, int64_t rows, int64_t vocab, int32_t* out) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "argmax");
  std::abort();
}
int32_t sample(const float* logits, int64_t vocab, const SamplingParams& params, uint64_t* rng_state, float* scratch) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "sample");
  std::abort();
}
}  // namespace mssm::cpu::MSSM_LEVEL
