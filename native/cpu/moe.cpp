// STUB: replaced by the real kernels.
#include "level.h"
#include <cstdio>
#include <cstdlib>

namespace mssm::cpu::MSSM_LEVEL {
void moe_route(const float* logits, int64_t tokens, int64_t experts, int64_t top_k, MoeScoring scoring,
               bool renormalize, float* weights, int32_t* indices, int32_t* counts) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "moe_route");
  std::abort();
}
void moe_experts(const MoeExpertsArgs& args) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "moe_experts");
  std::abort();
}
}  // namespace mssm::cpu::MSSM_LEVEL
