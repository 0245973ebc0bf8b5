#include "large_alloc.h"

#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mssm {

namespace {
constexpr size_t kMapThreshold = (size_t)2 << 20;
}

void* large_alloc(size_t bytes) {
  if (bytes == 0) bytes = 1;
#if defined(__linux__)
  if (bytes >= kMapThreshold) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    madvise(p, bytes, MADV_HUGEPAGE);
    return p;
  }
#endif
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!p) throw std::bad_alloc();
  return p;
}

bool large_alloc_zeroes(size_t bytes) {
#if defined(__linux__)
  return bytes >= kMapThreshold;
#else
  (void)bytes;
  return false;
#endif
}

void large_free(void* p, size_t bytes) noexcept {
  if (!p) return;
  if (bytes == 0) bytes = 1;
#if defined(__linux__)
  if (bytes >= kMapThreshold) {
    munmap(p, bytes);
    return;
  }
#endif
  std::free(p);
}

}  // namespace mssm
