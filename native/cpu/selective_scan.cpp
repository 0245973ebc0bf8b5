// STUB: replaced by the real kernels.
#include "level.h"
#include <cstdio>
#include <cstdlib>

namespace mssm::cpu::MSSM_LEVEL {
void selective_scan(const SelectiveScanArgs& args) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "selective_scan");
  std::abort();
}
void selective_state_update(const SelectiveScanArgs& args) {
  std::fprintf(stderr, "mamba-ssm: %s is not implemented\n", "selective_state_update");
  std::abort();
}
}  // namespace mssm::cpu::MSSM_LEVEL
