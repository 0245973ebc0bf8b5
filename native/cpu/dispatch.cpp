// Chooses the kernel table for the CPU level in use. Compiled once, without level flags.
#include "kernels.h"

namespace mssm::cpu {
namespace baseline { extern const KernelTable table; }
#if MSSM_HAVE_X86_LEVELS
namespace avx2 { extern const KernelTable table; }
namespace avx512 { extern const KernelTable table; }
namespace avx512bf16 { extern const KernelTable table; }
#endif

const KernelTable* kernels_for(CpuLevel level) {
  if (!cpu_level_supported(level)) return nullptr;
  switch (level) {
    case CpuLevel::baseline: return &baseline::table;
#if MSSM_HAVE_X86_LEVELS
    case CpuLevel::avx2: return &avx2::table;
    case CpuLevel::avx512: return &avx512::table;
    case CpuLevel::avx512bf16: return &avx512bf16::table;
#else
    default: return nullptr;
#endif
  }
  return nullptr;
}

const KernelTable& kernels() {
  const KernelTable* t = kernels_for(current_cpu_level());
  return t ? *t : baseline::table;
}

}  // namespace mssm::cpu
