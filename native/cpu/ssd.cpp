// STUB: replaced by the real kernels.
#include "level.h"
#include <cstdio>
#include <cstdlib>

namespace mssm::cpu::MSSM_LEVEL {
void ssd_chunked(const SsdArgs& args) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "ssd_chunked");
  std::abort();
}
void ssd_step(const SsdArgs& args) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "ssd_step");
  std::abort();
}
}  // namespace mssm::cpu::MSSM_LEVEL
