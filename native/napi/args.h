// Argument access for the N-API layer: every buffer argument is an ArrayBuffer checked for the byte
// size the kernel will touch, every integer for its range, so a wrong call from JavaScript is a thrown
// Error and never an out-of-bounds access. TypeScript (lib/ops) validates shapes first with friendlier
// messages; these checks are the last line.
#pragma once
#include <napi.h>

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/dtype.h"

namespace mssm::model {
struct Config;
struct Weight;
}

namespace mssm::napi {

struct ArgError {
  std::string message;
};

// Reads the named fields of the one object argument a binding takes.
class Args {
 public:
  Args(const Napi::CallbackInfo& info, const char* op) : env_(info.Env()), op_(op) {
    if (info.Length() >= 1 && info[0].IsObject()) obj_ = info[0].As<Napi::Object>();
  }

  [[noreturn]] void fail(const std::string& what) const { throw ArgError{std::string(op_) + ": " + what}; }

  Napi::Value get(const char* name) const {
    if (obj_.IsEmpty()) fail("expected one object of arguments");
    return obj_.Get(name);
  }
  bool is_null(const char* name) const {
    Napi::Value v = get(name);
    return v.IsNull() || v.IsUndefined();
  }

  int64_t integer(const char* name, int64_t min = 0, int64_t max = INT64_MAX) const {
    Napi::Value v = get(name);
    if (!v.IsNumber()) fail(std::string(name) + " must be a number");
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= -9.2e18 && d <= 9.2e18) || d != (double)(int64_t)d) {
      fail(std::string(name) + " must be an integer, got " + std::to_string(d));
    }
    int64_t n = (int64_t)d;
    if (n < min || n > max) {
      fail(std::string(name) + " must be in [" + std::to_string(min) + ", " + std::to_string(max) + "], got " +
           std::to_string(n));
    }
    return n;
  }

  double number(const char* name, double fallback) const {
    if (is_null(name)) return fallback;
    Napi::Value v = get(name);
    if (!v.IsNumber()) fail(std::string(name) + " must be a number");
    return v.As<Napi::Number>().DoubleValue();
  }

  bool boolean(const char* name, bool fallback) const {
    if (is_null(name)) return fallback;
    Napi::Value v = get(name);
    if (!v.IsBoolean()) fail(std::string(name) + " must be a boolean");
    return v.As<Napi::Boolean>().Value();
  }

  // A buffer of at least `bytes` bytes; null/undefined gives nullptr when optional.
  void* buffer(const char* name, int64_t bytes, bool optional = false) const {
    Napi::Value v = get(name);
    if (v.IsNull() || v.IsUndefined()) {
      if (optional) return nullptr;
      fail(std::string(name) + " is required");
    }
    if (!v.IsArrayBuffer()) fail(std::string(name) + " must be an ArrayBuffer");
    Napi::ArrayBuffer ab = v.As<Napi::ArrayBuffer>();
    bool detached = false;
    napi_is_detached_arraybuffer(env_, ab, &detached);
    if (detached) fail(std::string(name) + " has been disposed");
    if ((int64_t)ab.ByteLength() < bytes) {
      fail(std::string(name) + " holds " + std::to_string(ab.ByteLength()) + " bytes, needs " + std::to_string(bytes));
    }
    return ab.Data();
  }

  const float* f32(const char* name, int64_t count, bool optional = false) const {
    return static_cast<const float*>(buffer(name, count * 4, optional));
  }
  float* f32_out(const char* name, int64_t count, bool optional = false) const {
    return static_cast<float*>(buffer(name, count * 4, optional));
  }
  const int32_t* i32(const char* name, int64_t count, bool optional = false) const {
    return static_cast<const int32_t*>(buffer(name, count * 4, optional));
  }
  int32_t* i32_out(const char* name, int64_t count, bool optional = false) const {
    return static_cast<int32_t*>(buffer(name, count * 4, optional));
  }

  DType dtype(const char* name) const { return (DType)integer(name, 0, 4); }

 private:
  Napi::Env env_;
  Napi::Object obj_;
  const char* op_;
};

// Wraps a binding so ArgError and std::exception become JavaScript Errors.
template <typename F>
Napi::Value guarded(const Napi::CallbackInfo& info, F&& body) {
  try {
    return body();
  } catch (const ArgError& e) {
    Napi::Error::New(info.Env(), e.message).ThrowAsJavaScriptException();
  } catch (const std::bad_alloc&) {
    Napi::Error::New(info.Env(), "mamba-ssm: out of memory").ThrowAsJavaScriptException();
  } catch (const std::exception& e) {
    Napi::Error::New(info.Env(), std::string("mamba-ssm: ") + e.what()).ThrowAsJavaScriptException();
  }
  return info.Env().Undefined();
}

// Buffers in use by work off the JavaScript thread (a model call, a model's weights) are pinned:
// free() refuses them, so dispose() can never pull memory from under a running kernel.
void pin_buffer(const void* data);
void unpin_buffer(const void* data);
bool buffer_pinned(const void* data);

// Each family of bindings adds its functions to the module's exports.
void register_memory(Napi::Env env, Napi::Object exports);
void register_runtime(Napi::Env env, Napi::Object exports);
void register_ops(Napi::Env env, Napi::Object exports);
void register_bench(Napi::Env env, Napi::Object exports);
void register_mapfile(Napi::Env env, Napi::Object exports);
void register_model(Napi::Env env, Napi::Object exports);
void register_train(Napi::Env env, Napi::Object exports);
void register_cuda(Napi::Env env, Napi::Object exports);

// A model configuration object (the fields of lib/models/config.ts), checked; errors name the field.
model::Config read_model_config(const Args& args, Napi::Value value);
// A weights object {name: {buffer, dtype, shape, byteOffset?}}, checked; `buffers` receives each
// weight's ArrayBuffer (to keep referenced while the weights are read).
std::unordered_map<std::string, model::Weight> read_model_weights(
    const Args& args, Napi::Env env, Napi::Value value, std::vector<std::pair<std::string, Napi::ArrayBuffer>>* buffers);
// The array argument `name` of sequence lengths, each >= 1, at least one.
std::vector<int64_t> read_lengths(const Args& args, const char* name);
// The common arguments of a prefill: lengths, lastOnly, paddedLength (checked against the longest
// sequence; 0 when absent or lastOnly), useInitialState, segmentTokens (0: the runner's default) and
// the ids (Σ lengths, checked against the vocabulary); logit_rows is what the logits must hold.
struct ForwardRequest {
  std::vector<int32_t> ids;
  std::vector<int64_t> lengths;
  bool last_only = false;
  bool use_initial_state = false;
  int64_t padded_length = 0;
  int64_t logit_rows = 0;
  int64_t segment_tokens = 0;
};
ForwardRequest read_forward_request(const Args& args, int64_t vocab);
// `count` token ids copied out of the ArrayBuffer argument "ids", each checked to lie in [0, vocab).
std::vector<int32_t> read_token_ids(const Args& args, int64_t count, int64_t vocab);

}  // namespace mssm::napi
