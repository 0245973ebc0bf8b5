// Bindings of the model runner (native/model): create a model over weight ArrayBuffers, then run a
// prefill (modelForward) or a decode step (modelStep) as one native call each, off the event loop
// (an AsyncWorker resolving a Promise). Every size and byte length is checked here, on the main
// thread, before any work is queued, so a wrong call is a rejected Promise / thrown Error naming the
// argument, never an out-of-bounds access.
//
// The handle is a plain object wrapping a ModelHandle. It holds references to the weight ArrayBuffers
// so the garbage collector cannot free them while the model lives; a running call holds a reference
// to the handle so the model outlives it. modelRelease drops the weights at once, or when the last
// running call ends; the GC finaliser does the same for a handle that was never released.
// Weights must not be disposed (detached) while the model uses them: each call checks that none has
// been, but a weight disposed while a call is running is the caller's bug.
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "args.h"
#include "handle.h"
#include "model/mamba_model.h"

namespace mssm::napi {
namespace {

constexpr int64_t kMaxDim = (int64_t)1 << 40;
// Tags the handle objects so a stray object is refused rather than unwrapped.
constexpr napi_type_tag kModelTag = {0x6d616d62615f7373ull, 0x6d5f6d6f64656c31ull};

struct ModelHandle {
  std::shared_ptr<model::Model> model;
  std::vector<std::pair<std::string, Napi::ObjectReference>> weights;
  std::vector<const void*> pinned;  // the weights' memory, pinned while the model can use it
  int in_flight = 0;
  bool released = false;

  void drop() {
    model.reset();
    weights.clear();
    for (const void* p : pinned) unpin_buffer(p);
    pinned.clear();
  }
  ~ModelHandle() { drop(); }
};

// Reads fields of a nested object (config, one weight) with errors naming "<op>: <path>.<field>".
class Fields {
 public:
  Fields(const Args& args, Napi::Object object, std::string path) : args_(args), object_(object), path_(std::move(path)) {}

  std::string name(const char* field) const { return path_ + "." + field; }
  bool has(const char* field) const {
    Napi::Value v = object_.Get(field);
    return !v.IsUndefined() && !v.IsNull();
  }
  Napi::Value get(const char* field) const { return object_.Get(field); }

  int64_t integer(const char* field, int64_t min, int64_t max) const {
    Napi::Value v = object_.Get(field);
    if (!v.IsNumber()) args_.fail(name(field) + " must be a number, got " + describe(v));
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= (double)min && d <= (double)max) || d != std::floor(d)) {
      args_.fail(name(field) + " must be an integer in [" + std::to_string(min) + ", " + std::to_string(max) +
                 "], got " + number_string(d));
    }
    return (int64_t)d;
  }
  int64_t integer_or(const char* field, int64_t min, int64_t max, int64_t fallback) const {
    return has(field) ? integer(field, min, max) : fallback;
  }
  double number(const char* field) const {
    Napi::Value v = object_.Get(field);
    if (!v.IsNumber()) args_.fail(name(field) + " must be a number, got " + describe(v));
    return v.As<Napi::Number>().DoubleValue();
  }
  bool boolean(const char* field, bool fallback) const {
    if (!has(field)) return fallback;
    Napi::Value v = object_.Get(field);
    if (!v.IsBoolean()) args_.fail(name(field) + " must be a boolean, got " + describe(v));
    return v.As<Napi::Boolean>().Value();
  }

  static std::string number_string(double d) {
    if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
    if (d == std::floor(d) && std::fabs(d) < 1e15) return std::to_string((int64_t)d);
    return std::to_string(d);
  }
  static std::string describe(Napi::Value v) {
    if (v.IsUndefined()) return "undefined";
    if (v.IsNull()) return "null";
    if (v.IsNumber()) return number_string(v.As<Napi::Number>().DoubleValue());
    if (v.IsString()) return "\"" + v.As<Napi::String>().Utf8Value() + "\"";
    if (v.IsBoolean()) return v.As<Napi::Boolean>().Value() ? "true" : "false";
    if (v.IsArray()) return "an array";
    return "an object";
  }

 private:
  const Args& args_;
  Napi::Object object_;
  std::string path_;
};

model::Config read_config(const Args& args, Napi::Value value) {
  if (!value.IsObject()) args.fail("config must be an object");
  Fields f(args, value.As<Napi::Object>(), "config");
  model::Config c;
  Napi::Value arch = f.get("architecture");
  std::string arch_name = arch.IsString() ? arch.As<Napi::String>().Utf8Value() : "";
  if (arch_name == "mamba1") {
    c.architecture = model::Architecture::mamba1;
  } else if (arch_name == "mamba2") {
    c.architecture = model::Architecture::mamba2;
  } else {
    args.fail("config.architecture must be \"mamba1\" or \"mamba2\", got " + Fields::describe(arch));
  }
  c.hidden_size = f.integer("hiddenSize", 1, kMaxDim);
  c.num_layers = f.integer("numLayers", 1, 1 << 20);
  c.vocab_size = f.integer("vocabSize", 1, INT32_MAX);
  c.intermediate_size = f.integer("intermediateSize", 1, kMaxDim);
  c.state_size = f.integer("stateSize", 1, kMaxDim);
  c.conv_kernel = f.integer("convKernel", 1, 1024);
  if (c.mamba1()) {
    c.time_step_rank = f.integer("timeStepRank", 1, kMaxDim);
  } else {
    c.num_heads = f.integer("numHeads", 1, kMaxDim);
    c.head_dim = f.integer("headDim", 1, kMaxDim);
    c.num_groups = f.integer("numGroups", 1, kMaxDim);
    c.chunk_size = f.integer("chunkSize", 1, 1 << 20);
    if (f.has("timeStepLimit")) {
      Napi::Value limit = f.get("timeStepLimit");
      if (!limit.IsArray() || limit.As<Napi::Array>().Length() != 2) {
        args.fail("config.timeStepLimit must be [min, max], got " + Fields::describe(limit));
      }
      Fields l(args, limit.As<Napi::Object>(), "config.timeStepLimit");
      c.time_step_min = (float)l.number("0");
      c.time_step_max = (float)l.number("1");
    }
    c.norm_before_gate = f.boolean("normBeforeGate", false);
  }
  c.use_bias = f.boolean("useBias", false);
  c.use_conv_bias = f.boolean("useConvBias", true);
  c.norm_eps = (float)(f.has("normEps") ? f.number("normEps") : 1e-5);
  c.tie_embeddings = f.boolean("tieEmbeddings", true);
  if (f.has("moe")) {
    Napi::Value moe = f.get("moe");
    if (!moe.IsObject() || moe.IsArray()) args.fail("config.moe must be an object, got " + Fields::describe(moe));
    Fields m(args, moe.As<Napi::Object>(), "config.moe");
    Napi::Value layers = m.get("layers");
    if (!layers.IsArray()) {
      args.fail("config.moe.layers must be an array of layer indices, got " + Fields::describe(layers));
    }
    Fields l(args, layers.As<Napi::Object>(), "config.moe.layers");
    const uint32_t count = layers.As<Napi::Array>().Length();
    for (uint32_t j = 0; j < count; ++j) {
      c.moe.layers.push_back(l.integer(std::to_string(j).c_str(), 0, c.num_layers - 1));
    }
    c.moe.experts = m.integer("numExperts", 1, 1 << 16);
    c.moe.top_k = m.integer("topK", 1, 1 << 16);
    c.moe.hidden = m.integer("hiddenSize", 1, kMaxDim);
    auto choice = [&](const char* field, std::initializer_list<const char*> names, const char* fallback) {
      if (!m.has(field)) return std::string(fallback);
      Napi::Value v = m.get(field);
      const std::string got = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
      std::string expected;
      for (const char* n : names) {
        if (got == n) return got;
        expected += std::string(expected.empty() ? "" : ", ") + "\"" + n + "\"";
      }
      args.fail(m.name(field) + " must be one of " + expected + ", got " + Fields::describe(v));
      return got;
    };
    c.moe.scoring = choice("scoring", {"softmax", "sigmoid"}, "softmax") == "softmax" ? cpu::MoeScoring::softmax
                                                                                      : cpu::MoeScoring::sigmoid;
    const std::string act = choice("activation", {"silu", "gelu", "gelu_tanh"}, "silu");
    c.moe.activation = act == "silu" ? cpu::Activation::silu
                       : act == "gelu" ? cpu::Activation::gelu
                                       : cpu::Activation::gelu_tanh;
    c.moe.renormalize = m.boolean("renormalize", true);
    c.moe.bias = m.boolean("bias", false);
  }
  try {
    model::validate_config(c);
  } catch (const std::invalid_argument& e) {
    args.fail(e.what());
  }
  return c;
}

bool is_detached(Napi::Env env, Napi::Value buffer) {
  bool detached = false;
  napi_is_detached_arraybuffer(env, buffer, &detached);
  return detached;
}

// One weight: {buffer: ArrayBuffer, dtype: number, shape: number[], byteOffset?: number}.
model::Weight read_weight(const Args& args, Napi::Env env, const std::string& name, Napi::Value value,
                          Napi::ArrayBuffer* buffer_out) {
  const std::string path = "weights[\"" + name + "\"]";
  if (!value.IsObject()) args.fail(path + " must be {buffer, dtype, shape}");
  Fields f(args, value.As<Napi::Object>(), path);
  Napi::Value buffer = f.get("buffer");
  if (!buffer.IsArrayBuffer()) args.fail(f.name("buffer") + " must be an ArrayBuffer, got " + Fields::describe(buffer));
  if (is_detached(env, buffer)) args.fail(path + " has been disposed");
  Napi::ArrayBuffer ab = buffer.As<Napi::ArrayBuffer>();
  model::Weight w;
  w.dtype = (DType)f.integer("dtype", 0, 4);
  Napi::Value shape = f.get("shape");
  if (!shape.IsArray()) args.fail(f.name("shape") + " must be an array of sizes, got " + Fields::describe(shape));
  Napi::Array dims = shape.As<Napi::Array>();
  Fields d(args, dims, f.name("shape"));
  for (uint32_t i = 0; i < dims.Length(); ++i) w.shape.push_back(d.integer(std::to_string(i).c_str(), 0, kMaxDim));
  const int64_t length = (int64_t)ab.ByteLength();
  const int64_t offset = f.integer_or("byteOffset", 0, length, 0);
  const int64_t align = w.dtype == DType::f32 ? 4 : (w.dtype == DType::q8_0 ? 1 : 2);
  if (offset % align) args.fail(f.name("byteOffset") + " " + std::to_string(offset) + " is not a multiple of " +
                                std::to_string(align) + " for " + dtype_name(w.dtype));
  w.data = static_cast<const uint8_t*>(ab.Data()) + offset;
  w.bytes = length - offset;
  *buffer_out = ab;
  return w;
}

// The weights object {name: {buffer, dtype, shape, byteOffset?}}; `buffers` gets each weight's ArrayBuffer.
std::unordered_map<std::string, model::Weight> read_weights(const Args& a, Napi::Env env, Napi::Value value,
                                                            std::vector<std::pair<std::string, Napi::ArrayBuffer>>* buffers) {
  if (!value.IsObject()) a.fail("weights must be an object of {name: {buffer, dtype, shape}}");
  Napi::Object weights = value.As<Napi::Object>();
  Napi::Array names = weights.GetPropertyNames();
  std::unordered_map<std::string, model::Weight> table;
  for (uint32_t i = 0; i < names.Length(); ++i) {
    std::string name = names.Get(i).ToString().Utf8Value();
    Napi::ArrayBuffer buffer;
    table[name] = read_weight(a, env, name, weights.Get(name), &buffer);
    buffers->emplace_back(name, buffer);
  }
  return table;
}

ModelHandle* unwrap_model(const Args& args, Napi::Env env, Napi::Value value) {
  ModelHandle* handle = tagged_record<ModelHandle>(env, value, kModelTag);
  if (!handle) args.fail("model must be a model handle from modelCreate");
  if (handle->released) args.fail("model has been released");
  for (const auto& entry : handle->weights) {
    if (is_detached(env, entry.second.Value())) {
      args.fail("weight \"" + entry.first + "\" has been disposed while the model still uses it");
    }
  }
  return handle;
}

Napi::Value ModelCreate(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "modelCreate");
    model::Config config = read_config(a, a.get("config"));
    std::vector<std::pair<std::string, Napi::ArrayBuffer>> buffers;
    std::unordered_map<std::string, model::Weight> table = read_weights(a, env, a.get("weights"), &buffers);
    auto handle = std::make_unique<ModelHandle>();
    for (auto& [name, buffer] : buffers) {
      handle->weights.emplace_back(name, Napi::Persistent(buffer.As<Napi::Object>()));
      pin_buffer(buffer.Data());
      handle->pinned.push_back(buffer.Data());
    }
    try {
      handle->model = std::make_shared<model::Model>(config, table);
    } catch (const std::invalid_argument& e) {
      a.fail(e.what());
    }
    return wrap_record(a, env, std::move(handle), kModelTag, "model");
  });
}

// Runs one model call on a worker thread and settles a Promise. The work owns copies of the small
// inputs (ids, lengths) and holds the handle and every buffer it writes.
class ModelWorker : public PromiseWorker {
 public:
  ModelWorker(Napi::Env env, const char* op, const Args& a, ModelHandle* handle)
      : PromiseWorker(env, op), handle_(handle), model_(handle->model) {
    hold(a.get("model"));
    for (const char* name : {"logits", "convState", "ssmState"}) hold(a.get(name));
    ++handle_->in_flight;
  }

  bool step = false;
  std::vector<int32_t> ids;
  std::vector<int64_t> lengths;
  model::ForwardArgs forward;
  model::StepArgs step_args;

 protected:
  void Execute() override {
    try {
      if (step) {
        step_args.ids = ids.data();
        model_->step(step_args);
      } else {
        forward.ids = ids.data();
        forward.lengths = lengths.data();
        model_->forward(forward);
      }
    } catch (const std::bad_alloc&) {
      SetError(std::string(op_) + ": out of memory");
    } catch (const std::exception& e) {
      SetError(std::string(op_) + ": " + e.what());
    }
  }
  void settled() override { end_call(handle_); }

 private:
  ModelHandle* handle_;
  std::shared_ptr<model::Model> model_;
};

int64_t checked_mul(const Args& a, int64_t x, int64_t y) {
  if (x != 0 && y > kMaxDim / x) a.fail("sizes overflow");
  return x * y;
}

Napi::Value ModelForward(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "modelForward");
    ModelHandle* handle = unwrap_model(a, env, a.get("model"));
    const model::Model& m = *handle->model;
    const int64_t vocab = m.config().vocab_size;
    ForwardRequest r = read_forward_request(a, vocab);
    const int64_t sequences = (int64_t)r.lengths.size();
    float* logits = a.f32_out("logits", r.logit_rows * vocab);  // read_forward_request checked the product
    float* conv = a.f32_out("convState", m.conv_state_floats(sequences), true);
    float* ssm = a.f32_out("ssmState", m.ssm_state_floats(sequences), true);
    if ((conv == nullptr) != (ssm == nullptr)) a.fail("convState and ssmState go together: give both or neither");
    if (r.use_initial_state && !conv) a.fail("useInitialState needs convState and ssmState");

    auto* worker = new ModelWorker(env, "modelForward", a, handle);
    worker->ids = std::move(r.ids);
    worker->lengths = std::move(r.lengths);
    worker->forward.sequences = sequences;
    worker->forward.last_only = r.last_only;
    worker->forward.logits = logits;
    worker->forward.conv_state = conv;
    worker->forward.ssm_state = ssm;
    worker->forward.use_initial_state = r.use_initial_state;
    worker->forward.segment_tokens = r.segment_tokens;
    worker->forward.padded_length = r.padded_length;
    return worker->start();
  });
}

Napi::Value ModelStep(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "modelStep");
    ModelHandle* handle = unwrap_model(a, env, a.get("model"));
    const model::Model& m = *handle->model;
    const int64_t vocab = m.config().vocab_size;
    int64_t batch;
    if (a.is_null("batch")) {
      Napi::Value ids_value = a.get("ids");
      if (!ids_value.IsArrayBuffer()) a.fail("ids must be an ArrayBuffer");
      batch = (int64_t)ids_value.As<Napi::ArrayBuffer>().ByteLength() / 4;
      if (batch < 1) a.fail("ids must hold at least one token");
    } else {
      batch = a.integer("batch", 1, 1 << 24);
    }
    float* conv = a.f32_out("convState", m.conv_state_floats(batch));
    float* ssm = a.f32_out("ssmState", m.ssm_state_floats(batch));
    float* logits = a.f32_out("logits", checked_mul(a, batch, vocab));
    std::vector<int32_t> ids = read_token_ids(a, batch, vocab);

    auto* worker = new ModelWorker(env, "modelStep", a, handle);
    worker->step = true;
    worker->ids = std::move(ids);
    worker->step_args.batch = batch;
    worker->step_args.conv_state = conv;
    worker->step_args.ssm_state = ssm;
    worker->step_args.logits = logits;
    return worker->start();
  });
}

Napi::Value ModelStateSizes(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "modelStateSizes");
    ModelHandle* handle = unwrap_model(a, env, a.get("model"));
    const model::Config& c = handle->model->config();
    const int64_t batch = a.integer("batch", 1, 1 << 24);
    Napi::Object out = Napi::Object::New(env);
    out.Set("conv", Napi::Number::New(env, (double)handle->model->conv_state_floats(batch)));
    out.Set("ssm", Napi::Number::New(env, (double)handle->model->ssm_state_floats(batch)));
    auto shape = [&](std::initializer_list<int64_t> dims) {
      Napi::Array arr = Napi::Array::New(env, dims.size());
      uint32_t i = 0;
      for (int64_t d : dims) arr.Set(i++, Napi::Number::New(env, (double)d));
      return arr;
    };
    const int64_t layers = c.state_layers();
    out.Set("convShape", shape({layers, batch, c.conv_kernel - 1, c.conv_channels()}));
    out.Set("ssmShape", c.mamba1() ? shape({layers, batch, c.intermediate_size, c.state_size})
                                   : shape({layers, batch, c.num_heads, c.head_dim, c.state_size}));
    return out;
  });
}

Napi::Value ModelRelease(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "modelRelease");
    ModelHandle* handle = tagged_record<ModelHandle>(env, info.Length() >= 1 ? info[0] : env.Undefined(), kModelTag);
    if (!handle) a.fail("expected a model handle from modelCreate");
    release_record(handle);
    return env.Undefined();
  });
}

}  // namespace

model::Config read_model_config(const Args& args, Napi::Value value) { return read_config(args, value); }

std::unordered_map<std::string, model::Weight> read_model_weights(
    const Args& args, Napi::Env env, Napi::Value value, std::vector<std::pair<std::string, Napi::ArrayBuffer>>* buffers) {
  return read_weights(args, env, value, buffers);
}

std::vector<int64_t> read_lengths(const Args& a, const char* name) {
  Napi::Value value = a.get(name);
  if (!value.IsArray()) a.fail(std::string(name) + " must be an array of sequence lengths");
  Napi::Array array = value.As<Napi::Array>();
  Fields f(a, array, name);
  std::vector<int64_t> lengths;
  int64_t total = 0;
  for (uint32_t i = 0; i < array.Length(); ++i) {
    lengths.push_back(f.integer(std::to_string(i).c_str(), 1, kMaxDim));
    total += lengths.back();
    if (total > kMaxDim) a.fail("sizes overflow");
  }
  if (lengths.empty()) a.fail(std::string(name) + " must hold at least one sequence");
  return lengths;
}

ForwardRequest read_forward_request(const Args& a, int64_t vocab) {
  ForwardRequest r;
  r.lengths = read_lengths(a, "lengths");
  int64_t total = 0, longest = 0;
  for (int64_t n : r.lengths) {
    total += n;
    longest = std::max(longest, n);
  }
  const int64_t sequences = (int64_t)r.lengths.size();
  r.last_only = a.boolean("lastOnly", false);
  r.use_initial_state = a.boolean("useInitialState", false);
  const int64_t padded = a.is_null("paddedLength") ? 0 : a.integer("paddedLength", 1, kMaxDim);
  if (padded > 0 && longest > padded) {
    a.fail("paddedLength " + std::to_string(padded) + " is shorter than the longest sequence (" +
           std::to_string(longest) + " tokens)");
  }
  r.padded_length = r.last_only ? 0 : padded;
  r.logit_rows = r.last_only ? sequences : padded > 0 ? checked_mul(a, sequences, padded) : total;
  checked_mul(a, r.logit_rows, vocab);
  r.segment_tokens = a.is_null("segmentTokens") ? 0 : a.integer("segmentTokens", 1, kMaxDim);
  r.ids = read_token_ids(a, total, vocab);
  return r;
}

std::vector<int32_t> read_token_ids(const Args& a, int64_t count, int64_t vocab) {
  const int32_t* ids = a.i32("ids", count);
  std::vector<int32_t> out(ids, ids + count);
  for (int64_t i = 0; i < count; ++i) {
    if (out[i] < 0 || out[i] >= vocab) {
      a.fail("token id " + std::to_string(out[i]) + " at position " + std::to_string(i) +
             " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
    }
  }
  return out;
}

void register_model(Napi::Env env, Napi::Object exports) {
  exports.Set("modelCreate", Napi::Function::New(env, ModelCreate, "modelCreate"));
  exports.Set("modelForward", Napi::Function::New(env, ModelForward, "modelForward"));
  exports.Set("modelStep", Napi::Function::New(env, ModelStep, "modelStep"));
  exports.Set("modelStateSizes", Napi::Function::New(env, ModelStateSizes, "modelStateSizes"));
  exports.Set("modelRelease", Napi::Function::New(env, ModelRelease, "modelRelease"));
}

}  // namespace mssm::napi
