#include "cpu_features.h"

#include <cstdlib>
#include <mutex>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define MSSM_X86 1
#include <cpuid.h>
#endif

namespace mssm {

namespace {

#if MSSM_X86
uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return ((uint64_t)edx << 32) | eax;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if MSSM_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  f.sse2 = d & (1u << 26);
  bool osxsave = c & (1u << 27);
  bool avx_cpu = c & (1u << 28);
  bool fma_cpu = c & (1u << 12);
  bool f16c_cpu = c & (1u << 29);
  uint64_t xcr0 = osxsave ? read_xcr0() : 0;
  bool os_avx = (xcr0 & 0x6) == 0x6;            // XMM and YMM state
  bool os_avx512 = (xcr0 & 0xe6) == 0xe6;       // plus opmask, ZMM_Hi256, Hi16_ZMM
  bool os_amx = (xcr0 & 0x60000) == 0x60000;    // XTILECFG, XTILEDATA
  f.avx = avx_cpu && os_avx;
  f.fma = fma_cpu && f.avx;
  f.f16c = f16c_cpu && f.avx;
  unsigned a7, b7, c7, d7;
  if (__get_cpuid_count(7, 0, &a7, &b7, &c7, &d7)) {
    f.avx2 = (b7 & (1u << 5)) && f.avx;
    f.avx512f = (b7 & (1u << 16)) && os_avx512;
    f.avx512dq = (b7 & (1u << 17)) && os_avx512;
    f.avx512bw = (b7 & (1u << 30)) && os_avx512;
    f.avx512vl = (b7 & (1u << 31)) && os_avx512;
    f.avx512vnni = (c7 & (1u << 11)) && os_avx512;
    f.amx_bf16 = (d7 & (1u << 22)) && os_amx;
    f.amx_tile = (d7 & (1u << 24)) && os_amx;
    f.amx_int8 = (d7 & (1u << 25)) && os_amx;
    unsigned a71, b71, c71, d71;
    if (a7 >= 1 && __get_cpuid_count(7, 1, &a71, &b71, &c71, &d71)) {
      f.avx_vnni = (a71 & (1u << 4)) && f.avx;
      f.avx512bf16 = (a71 & (1u << 5)) && os_avx512;
    }
  }
#elif defined(__aarch64__)
  f.neon = true;
#endif
  return f;
}

std::once_flag g_init;
CpuLevel g_level = CpuLevel::baseline;
std::string g_error;

void init_level() {
  g_level = best_cpu_level();
  const char* env = std::getenv("MAMBA_SSM_CPU");
  if (env && *env) {
    CpuLevel want;
    if (!parse_cpu_level(env, &want)) {
      g_error = std::string("MAMBA_SSM_CPU=") + env + " is not a CPU level; expected baseline, avx2, avx512 or avx512bf16";
    } else if (!cpu_level_supported(want)) {
      g_error = std::string("MAMBA_SSM_CPU=") + env + " is not supported by this CPU; the best it supports is " +
                cpu_level_name(g_level);
    } else {
      g_level = want;
    }
  }
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* cpu_level_name(CpuLevel level) {
  switch (level) {
    case CpuLevel::baseline: return "baseline";
    case CpuLevel::avx2: return "avx2";
    case CpuLevel::avx512: return "avx512";
    case CpuLevel::avx512bf16: return "avx512bf16";
  }
  return "unknown";
}

bool parse_cpu_level(const std::string& name, CpuLevel* out) {
  for (int i = 0; i < kCpuLevelCount; ++i) {
    if (name == cpu_level_name((CpuLevel)i)) { *out = (CpuLevel)i; return true; }
  }
  return false;
}

bool cpu_level_supported(CpuLevel level) {
  const CpuFeatures& f = cpu_features();
  switch (level) {
    case CpuLevel::baseline: return true;
#if MSSM_X86
    case CpuLevel::avx2: return f.avx2 && f.fma && f.f16c;
    case CpuLevel::avx512:
      return f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
    case CpuLevel::avx512bf16:
      return cpu_level_supported(CpuLevel::avx512) && f.avx512bf16 && f.avx512vnni;
#else
    default: (void)f; return false;
#endif
  }
  return false;
}

CpuLevel best_cpu_level() {
  for (int i = kCpuLevelCount - 1; i > 0; --i) {
    if (cpu_level_supported((CpuLevel)i)) return (CpuLevel)i;
  }
  return CpuLevel::baseline;
}

CpuLevel current_cpu_level() {
  std::call_once(g_init, init_level);
  return g_level;
}

bool set_cpu_level(CpuLevel level) {
  std::call_once(g_init, init_level);
  if (!cpu_level_supported(level)) return false;
  g_level = level;
  return true;
}

const std::string& cpu_level_error() {
  std::call_once(g_init, init_level);
  return g_error;
}

}  // namespace mssm
