// CPU feature detection and the kernel level chosen for this process.
#pragma once
#include <string>

namespace mssm {

// Kernel levels, lowest first. Each is compiled into the one binary; the highest the CPU (and OS)
// supports is used unless MAMBA_SSM_CPU or set_cpu_level() asks for a lower one.
// avx512bf16 is avx512 plus the BF16 dot product (VDPBF16PS) and VNNI int8 dot products
// (Zen 4 and later, Cooper Lake, Sapphire Rapids and later).
enum class CpuLevel : int { baseline = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3 };
constexpr int kCpuLevelCount = 4;

const char* cpu_level_name(CpuLevel level);
// Parses "baseline" | "avx2" | "avx512" | "avx512bf16"; returns false on anything else.
bool parse_cpu_level(const std::string& name, CpuLevel* out);

// Whether the CPU and OS can run kernels of this level, and whether this binary contains them.
bool cpu_level_supported(CpuLevel level);
CpuLevel best_cpu_level();

// The level in use. The first call reads MAMBA_SSM_CPU (an unsupported or unknown value falls back
// to the best level and is reported by cpu_level_error()).
CpuLevel current_cpu_level();
// Returns false (and changes nothing) when the level is not supported here.
bool set_cpu_level(CpuLevel level);
// Non-empty when MAMBA_SSM_CPU held a value that could not be honoured.
const std::string& cpu_level_error();

// Extra features kernels may test at run time within their level.
struct CpuFeatures {
  bool sse2 = false, avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512bf16 = false, avx512vnni = false, avx_vnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool neon = false;
};
const CpuFeatures& cpu_features();

}  // namespace mssm
