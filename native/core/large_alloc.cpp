#include "large_alloc.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mssm {

namespace {
// From here up buffers are mapped directly and their mappings cached. At glibc's mmap threshold:
// above it malloc maps and unmaps a one-token step's logits (a 50k vocabulary: 201 KB) on every step,
// and the fresh mapping faults in each of its 50 pages, 0.7–1.1 ms a step in this project's VMs.
constexpr size_t kMapThreshold = (size_t)128 << 10;

#if defined(__linux__)
constexpr size_t kPage = 4096, kHugePage = (size_t)2 << 20;

// Bytes mapped for a buffer of `bytes`: whole 4 KiB pages (the tail past the last huge page stays in
// small pages rather than rounding the mapping up to 2 MiB).
size_t mapped_bytes(size_t bytes) { return (bytes + kPage - 1) / kPage * kPage; }

// A fresh mapping of `size` bytes. From 2 MiB up it starts on a 2 MiB boundary, so that every whole
// 2 MiB of it can be a huge page (mmap alone aligns to 4 KiB, which leaves a 3 MiB buffer no whole
// huge page about half the time).
void* map_fresh(size_t size) {
  if (size < kHugePage) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    return p;
  }
  void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t begin = (uintptr_t)raw, aligned = (begin + kHugePage - 1) / kHugePage * kHugePage;
  if (aligned > begin) munmap(raw, aligned - begin);
  const uintptr_t end = begin + size + kHugePage, used_end = aligned + size;
  if (end > used_end) munmap((void*)used_end, end - used_end);
  madvise((void*)aligned, size, MADV_HUGEPAGE);
  return (void*)aligned;
}

// Recently freed mappings, kept for the next buffer of the same size: a decode loop frees and asks for
// the same logits tensor every step, and a fresh mapping costs a page fault per page touched (several
// microseconds each in this project's VMs: ~800 faults, milliseconds, for one 16-sequence step's
// 3.2 MB of logits). Bounded in count, in size per mapping and in total, oldest dropped first.
constexpr int kCacheSlots = 8;
constexpr size_t kCacheMaxMapping = (size_t)64 << 20, kCacheMaxTotal = (size_t)256 << 20;
struct Cached {
  void* p;
  size_t size;
};
std::mutex g_cache_mu;
Cached g_cache[kCacheSlots];
int g_cached = 0;
size_t g_cached_bytes = 0;

// Removes slot i (g_cache_mu held) and returns its mapping.
void* remove_slot(int i) {
  void* p = g_cache[i].p;
  g_cached_bytes -= g_cache[i].size;
  for (int j = i; j + 1 < g_cached; ++j) g_cache[j] = g_cache[j + 1];
  --g_cached;
  return p;
}

void* take_cached(size_t size) {
  std::lock_guard<std::mutex> lock(g_cache_mu);
  for (int i = g_cached - 1; i >= 0; --i)
    if (g_cache[i].size == size) return remove_slot(i);
  return nullptr;
}

// Keeps the mapping if it fits the bounds (dropping the oldest to make room); false: unmap it.
bool keep(void* p, size_t size) {
  if (size > kCacheMaxMapping) return false;
  std::lock_guard<std::mutex> lock(g_cache_mu);
  while (g_cached > 0 && (g_cached == kCacheSlots || g_cached_bytes + size > kCacheMaxTotal)) {
    const size_t oldest = g_cache[0].size;
    munmap(remove_slot(0), oldest);
  }
  g_cache[g_cached++] = {p, size};
  g_cached_bytes += size;
  return true;
}

// A mapping of at least `bytes`; *fresh: whether it is newly mapped (zero-filled).
void* map(size_t bytes, bool* fresh) {
  const size_t size = mapped_bytes(bytes);
  if (void* p = take_cached(size)) {
    *fresh = false;
    return p;
  }
  *fresh = true;
  return map_fresh(size);
}
#endif
}  // namespace

void* large_alloc(size_t bytes) {
  if (bytes == 0) bytes = 1;
#if defined(__linux__)
  if (bytes >= kMapThreshold) {
    bool fresh = false;
    return map(bytes, &fresh);
  }
#endif
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!p) throw std::bad_alloc();
  return p;
}

void* large_alloc_zeroed(size_t bytes) {
  if (bytes == 0) bytes = 1;
#if defined(__linux__)
  if (bytes >= kMapThreshold) {
    bool fresh = false;
    void* p = map(bytes, &fresh);
    if (!fresh) std::memset(p, 0, bytes);
    return p;
  }
#endif
  void* p = large_alloc(bytes);
  std::memset(p, 0, bytes);
  return p;
}

void large_free(void* p, size_t bytes) noexcept {
  if (!p) return;
  if (bytes == 0) bytes = 1;
#if defined(__linux__)
  if (bytes >= kMapThreshold) {
    const size_t size = mapped_bytes(bytes);
    if (!keep(p, size)) munmap(p, size);
    return;
  }
#endif
  std::free(p);
}

}  // namespace mssm
