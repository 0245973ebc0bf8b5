// Native tensor memory: 64-byte aligned, zero-filled blocks exposed as external ArrayBuffers.
// The ArrayBuffer owns the block: its finalizer frees it (the safety net when a tensor is dropped
// without dispose()), and free() detaches it, which frees the block at once and leaves every view of it
// empty rather than dangling. The bytes are reported to V8 so its heuristics see the real footprint.
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "../core/large_alloc.h"
#include "args.h"

namespace mssm::napi {
namespace {

std::mutex g_pin_mu;
std::unordered_map<const void*, int> g_pins;

// Blocks come from large_alloc_zeroed (large ones mapped directly, in transparent huge pages where
// the kernel gives them, and reused once freed: a decode loop's logits tensor every step).
struct Block {
  int64_t bytes;
};

void finalize_block(Napi::Env env, void* data, Block* block) {
  const int64_t bytes = block->bytes;
  large_free(data, (size_t)bytes);
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
    void* data = large_alloc_zeroed(padded);
    Napi::MemoryManagement::AdjustExternalMemory(info.Env(), (int64_t)padded);
    return Napi::ArrayBuffer::New(info.Env(), data, (size_t)bytes, finalize_block, new Block{(int64_t)padded});
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
