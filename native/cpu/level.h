// Included first by every per-level kernel source. The build defines MSSM_LEVEL to baseline, avx2,
// avx512 or avx512bf16 and passes that level's compiler flags; the kernels then live in mssm::cpu::MSSM_LEVEL.
#pragma once
#ifndef MSSM_LEVEL
#error "MSSM_LEVEL must be defined (baseline, avx2, avx512 or avx512bf16) when compiling a kernel source"
#endif
#include "kernels.h"
#include "kernel_decls.h"
