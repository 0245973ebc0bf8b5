// Native tensor memory: 64-byte aligned, zero-filled blocks exposed as external ArrayBuffers.
// The ArrayBuffer owns the block: its finalizer frees it (the safety net when a tensor is dropped
// without dispose()), and free() detaches it, which frees the block at once and leaves every view of it
// empty rather than dangling. The bytes are reported to V8 so its heuristics see the real footprint.
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "args.h"

namespace mssm::napi {
namespace {

std::mutex g_pin_mu;
std::unordered_map<const void*, int> g_pins;

// Blocks of 2 MiB and more are mapped directly: the pages come zeroed and are touched only when
// used, and transparent huge pages (asked for with madvise) make faulting them in far cheaper.
constexpr size_t kMapThreshold = (size_t)2 << 20;

struct Block {
  int64_t bytes;
  bool mapped;
};

void* allocate(size_t bytes, bool* mapped) {
#if defined(__linux__)
  if (bytes >= kMapThreshold) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    madvise(p, bytes, MADV_HUGEPAGE);
    *mapped = true;
    return p;
  }
#endif
  *mapped = false;
  void* p = std::aligned_alloc(64, bytes);
  if (p) std::memset(p, 0, bytes);
  return p;
}

void finalize_block(Napi::Env env, void* data, Block* block) {
  int64_t bytes = block->bytes;
#if defined(__linux__)
  if (block->mapped) {
    munmap(data, (size_t)bytes);
  } else {
    std::free(data);
  }
#else
  std::free(data);
#endif
  delete block;
  Napi::MemoryManagement::AdjustExternalMemory(env, -bytes);
}

Napi::Value Alloc(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    if (info.Length() < 1 || !info[0].IsNumber()) Args(info, "alloc").fail("byteLength must be a number");
    double requested = info[0].As<Napi::Number>().DoubleValue();
    if (!(requested >= 0 && requested <= (double)((int64_t)1 << 46)) || requested != (double)(int64_t)requested) {
      Args(info, "alloc").fail("byteLength must be a non-negative integer below 2^46");
    }
    int64_t bytes = (int64_t)requested;
    size_t padded = (size_t)((bytes + 63) / 64 * 64);
    if (padded == 0) padded = 64;
    bool mapped = false;
    void* data = allocate(padded, &mapped);
    if (!data) throw std::bad_alloc();
    Napi::MemoryManagement::AdjustExternalMemory(info.Env(), (int64_t)padded);
    return Napi::ArrayBuffer::New(info.Env(), data, (size_t)bytes, finalize_block, new Block{(int64_t)padded, mapped});
  });
}

Napi::Value Free(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    if (info.Length() < 1 || !info[0].IsArrayBuffer()) Args(info, "free").fail("argument must be an ArrayBuffer");
    Napi::ArrayBuffer ab = info[0].As<Napi::ArrayBuffer>();
    bool detached = false;
    napi_is_detached_arraybuffer(info.Env(), ab, &detached);
    if (detached) return info.Env().Undefined();
    if (buffer_pinned(ab.Data())) {
      Args(info, "dispose").fail("the tensor is in use by a running model call (or a live model's weights); "
                                 "await the call or dispose the model first");
    }
    ab.Detach();
    return info.Env().Undefined();
  });
}

Napi::Value IsDetached(const Napi::CallbackInfo& info) {
  bool detached = false;
  if (info.Length() >= 1 && info[0].IsArrayBuffer()) napi_is_detached_arraybuffer(info.Env(), info[0], &detached);
  return Napi::Boolean::New(info.Env(), detached);
}

}  // namespace

void pin_buffer(const void* data) {
  if (!data) return;
  std::lock_guard<std::mutex> lock(g_pin_mu);
  ++g_pins[data];
}

void unpin_buffer(const void* data) {
  if (!data) return;
  std::lock_guard<std::mutex> lock(g_pin_mu);
  auto it = g_pins.find(data);
  if (it != g_pins.end() && --it->second == 0) g_pins.erase(it);
}

bool buffer_pinned(const void* data) {
  std::lock_guard<std::mutex> lock(g_pin_mu);
  return g_pins.count(data) != 0;
}

void register_memory(Napi::Env env, Napi::Object exports) {
  exports.Set("alloc", Napi::Function::New(env, Alloc, "alloc"));
  exports.Set("free", Napi::Function::New(env, Free, "free"));
  exports.Set("isDetached", Napi::Function::New(env, IsDetached, "isDetached"));
}

}  // namespace mssm::napi
