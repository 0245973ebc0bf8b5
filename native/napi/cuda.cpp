// Bindings of the CUDA model runner (native/cuda/cuda_model.h): a model whose weights live on an
// NVIDIA GPU, recurrent states that live there too, and a prefill (cudaModelForward) or a decode step
// (cudaModelStep) as one native call each, off the event loop (an AsyncWorker resolving a Promise).
//
// Compiled into every addon. Only a build that links the CUDA backend (the CMake build run by
// `npm run build:cuda` where nvcc is found, which defines MSSM_NAPI_CUDA) has the model functions;
// every build has cudaInfo(), which says whether the backend is built in and whether a device and a
// driver are present, with the reason when not.
//
// Ids, lengths and logits are host ArrayBuffers: ids are copied to the device by the runner, logits
// are computed on the device and copied back into the caller's buffer. States are device memory owned
// by a state handle (cudaStateCreate); cudaStateRead / cudaStateWrite copy them from / to host f32
// buffers in the CPU runner's layout, so a state moves between devices and is saved as on the CPU.
//
// Handles are plain objects tagged with their kind and wrapping a native record (native/napi/handle.h).
// A running call holds references to its handles, so they outlive it; a release during a call takes
// effect when the call ends, and the GC finaliser frees a handle that was never released.
#include "args.h"

#ifdef MSSM_NAPI_CUDA
#include "handle.h"
#include "sampling_args.h"
#include <cuda_runtime.h>

#include <cstring>
#include <memory>
#include <mutex>

#include "cuda_model.h"
#include "model/mamba_model.h"
#endif

namespace mssm::napi {
namespace {

#ifndef MSSM_NAPI_CUDA

Napi::Value CudaInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("built", false);
  o.Set("cublas", false);
  o.Set("devices", Napi::Array::New(env));
  o.Set("error",
        "this build of mamba-ssm has no CUDA backend (the addon was compiled without nvcc); build it with "
        "`npm run build:cuda` on a machine with the CUDA toolkit");
  return o;
}

}  // namespace

void register_cuda(Napi::Env env, Napi::Object exports) {
  exports.Set("cudaInfo", Napi::Function::New(env, CudaInfo, "cudaInfo"));
}

#else

constexpr napi_type_tag kCudaModelTag = {0x6d616d62615f7373ull, 0x6d5f637564616d31ull};
constexpr napi_type_tag kCudaStateTag = {0x6d616d62615f7373ull, 0x6d5f637564617331ull};

std::string cuda_message(const char* call, cudaError_t e) {
  return std::string(call) + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

// Memsets and copies into device memory issued on the legacy default stream can still be running when
// they return, and the runner's stream does not wait for that stream (it is non-blocking): wait here,
// so a call queued next reads the finished state.
cudaError_t settle() { return cudaStreamSynchronize(cudaStreamLegacy); }

struct CudaModelHandle {
  std::unique_ptr<cuda::CudaModel> model;
  int device = 0;
  std::mutex mutex;  // one call at a time: the runner has one stream and one scratch
  float* forward_logits = nullptr;
  int64_t forward_capacity = 0;  // floats
  // One logits buffer per decode batch size: the runner's CUDA graph of a step is bound to the
  // pointers it was captured with, so a fixed buffer lets every step of a generation replay it.
  std::unordered_map<int64_t, float*> step_logits;
  // A sampling step's device buffers, each grown when a call needs more than it holds: the draws, the
  // penalty tokens (a generation's history: grown by doubling), the tokens out and the sampler's
  // workspace; capacities in bytes.
  struct Sampling {
    void *draws = nullptr, *penalty = nullptr, *tokens = nullptr, *work = nullptr;
    size_t draws_bytes = 0, penalty_bytes = 0, tokens_bytes = 0, work_bytes = 0;
    void free_all() {
      for (void* p : {draws, penalty, tokens, work}) cudaFree(p);
      *this = Sampling{};
    }
  } sampling;
  int in_flight = 0;
  bool released = false;

  void drop() {
    if (!model) return;
    cudaSetDevice(device);
    model.reset();
    cudaFree(forward_logits);
    forward_logits = nullptr;
    forward_capacity = 0;
    for (auto& entry : step_logits) cudaFree(entry.second);
    step_logits.clear();
    sampling.free_all();
  }
  ~CudaModelHandle() { drop(); }
};

struct CudaStateHandle {
  int device = 0;
  int64_t batch = 0;
  int64_t conv_floats = 0, ssm_floats = 0;
  float* conv = nullptr;
  float* ssm = nullptr;
  std::mutex mutex;  // a copy to or from the host waits for a call using the state
  int in_flight = 0;
  bool released = false;

  void drop() {
    if (!conv && !ssm) return;
    cudaSetDevice(device);
    cudaFree(conv);
    cudaFree(ssm);
    conv = ssm = nullptr;
  }
  ~CudaStateHandle() { drop(); }
};

template <typename T>
T* unwrap(const Args& a, Napi::Env env, Napi::Value value, const napi_type_tag& tag, const char* what,
          const char* from) {
  T* handle = tagged_record<T>(env, value, tag);
  if (!handle) a.fail(std::string(what) + " must be a handle from " + from);
  if (handle->released) a.fail(std::string(what) + " has been released");
  return handle;
}

CudaModelHandle* unwrap_model(const Args& a, Napi::Env env) {
  return unwrap<CudaModelHandle>(a, env, a.get("model"), kCudaModelTag, "model", "cudaModelCreate");
}
CudaStateHandle* unwrap_state(const Args& a, Napi::Env env, const char* name) {
  return unwrap<CudaStateHandle>(a, env, a.get(name), kCudaStateTag, name, "cudaStateCreate");
}

// A state handle must have been made for this model's sizes, batch and device.
void check_state(const Args& a, const CudaModelHandle& m, const CudaStateHandle& s, int64_t batch, const char* name) {
  if (s.device != m.device) {
    a.fail(std::string(name) + " lives on CUDA device " + std::to_string(s.device) + ", the model on device " +
           std::to_string(m.device));
  }
  if (s.batch != batch) {
    a.fail(std::string(name) + " holds " + std::to_string(s.batch) + " sequences, " + std::to_string(batch) + " given");
  }
  if (s.conv_floats != m.model->conv_state_floats(batch) || s.ssm_floats != m.model->ssm_state_floats(batch)) {
    a.fail(std::string(name) + " belongs to a model of another shape");
  }
}

Napi::Value CudaInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("built", true);
  o.Set("cublas", cuda::have_cublas());
  Napi::Array devices = Napi::Array::New(env);
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    o.Set("error", "no usable CUDA device or driver: " + cuda_message("cudaGetDeviceCount", e));
    count = 0;
  } else if (count == 0) {
    o.Set("error", "no CUDA device present");
  } else {
    o.Set("error", "");
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    Napi::Object d = Napi::Object::New(env);
    d.Set("index", i);
    d.Set("name", std::string(p.name));
    d.Set("computeCapability", std::to_string(p.major) + "." + std::to_string(p.minor));
    d.Set("memoryBytes", (double)p.totalGlobalMem);
    devices.Set(devices.Length(), d);
  }
  o.Set("devices", devices);
  return o;
}

// cudaModelCreate({config, weights, weightDType: "bf16" | "f32", device}): uploads the weights (a
// synchronous call: the host weights are read during it and not kept).
Napi::Value CudaModelCreate(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "cudaModelCreate");
    model::Config config = read_model_config(a, a.get("config"));
    std::vector<std::pair<std::string, Napi::ArrayBuffer>> buffers;
    std::unordered_map<std::string, model::Weight> table = read_model_weights(a, env, a.get("weights"), &buffers);
    cuda::ModelOptions options;
    Napi::Value dtype = a.get("weightDType");
    const std::string dtype_name = dtype.IsString() ? dtype.As<Napi::String>().Utf8Value() : "";
    if (dtype_name == "bf16" || dtype.IsUndefined()) {
      options.weights = cuda::WeightDType::bf16;
    } else if (dtype_name == "f32") {
      options.weights = cuda::WeightDType::f32;
    } else {
      a.fail("weightDType must be \"bf16\" or \"f32\"");
    }
    options.device = a.is_null("device") ? 0 : (int)a.integer("device", 0, 1 << 16);
    auto handle = std::make_unique<CudaModelHandle>();
    handle->device = options.device;
    const cuda::Status s = cuda::CudaModel::create(config, table, options, &handle->model);
    if (!s.ok()) a.fail(s.message);
    return wrap_record(a, env, std::move(handle), kCudaModelTag, "model");
  });
}

Napi::Value CudaModelInfo(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "cudaModelInfo");
    CudaModelHandle* m = unwrap_model(a, env);
    Napi::Object o = Napi::Object::New(env);
    o.Set("device", m->device);
    o.Set("weightBytes", (double)m->model->weight_bytes());
    o.Set("weightDType", m->model->options().weights == cuda::WeightDType::bf16 ? "bf16" : "f32");
    o.Set("cublas", m->model->uses_cublas());
    return o;
  });
}

// cudaStateCreate({model, batch}): a zero state for `batch` sequences on the model's device.
Napi::Value CudaStateCreate(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "cudaStateCreate");
    CudaModelHandle* m = unwrap_model(a, env);
    const int64_t batch = a.integer("batch", 1, 1 << 24);
    auto state = std::make_unique<CudaStateHandle>();
    state->device = m->device;
    state->batch = batch;
    state->conv_floats = m->model->conv_state_floats(batch);
    state->ssm_floats = m->model->ssm_state_floats(batch);
    cudaError_t e = cudaSetDevice(m->device);
    if (e == cudaSuccess) e = cudaMalloc(&state->conv, state->conv_floats * sizeof(float));
    if (e == cudaSuccess) e = cudaMalloc(&state->ssm, state->ssm_floats * sizeof(float));
    if (e == cudaSuccess) e = cudaMemset(state->conv, 0, state->conv_floats * sizeof(float));
    if (e == cudaSuccess) e = cudaMemset(state->ssm, 0, state->ssm_floats * sizeof(float));
    if (e == cudaSuccess) e = settle();
    if (e != cudaSuccess) a.fail("could not allocate the state on the device: " + cuda_message("cudaMalloc", e));
    return wrap_record(a, env, std::move(state), kCudaStateTag, "state");
  });
}

// cudaStateRead({state, conv, ssm}) copies the device state into host f32 buffers;
// cudaStateWrite({state, conv, ssm}) the other way; cudaStateCopy({from, to}) device to device.
// Each waits for a call in flight that uses the state.
Napi::Value StateTransfer(const Napi::CallbackInfo& info, const char* op, bool to_host) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, op);
    CudaStateHandle* s = unwrap_state(a, env, "state");
    float* conv = a.f32_out("conv", s->conv_floats);
    float* ssm = a.f32_out("ssm", s->ssm_floats);
    std::lock_guard<std::mutex> lock(s->mutex);
    const cudaMemcpyKind kind = to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
    cudaError_t e = cudaSetDevice(s->device);
    if (e == cudaSuccess) {
      e = to_host ? cudaMemcpy(conv, s->conv, s->conv_floats * 4, kind) : cudaMemcpy(s->conv, conv, s->conv_floats * 4, kind);
    }
    if (e == cudaSuccess) {
      e = to_host ? cudaMemcpy(ssm, s->ssm, s->ssm_floats * 4, kind) : cudaMemcpy(s->ssm, ssm, s->ssm_floats * 4, kind);
    }
    if (e == cudaSuccess && !to_host) e = settle();
    if (e != cudaSuccess) a.fail(cuda_message("cudaMemcpy", e));
    return env.Undefined();
  });
}
Napi::Value CudaStateRead(const Napi::CallbackInfo& info) { return StateTransfer(info, "cudaStateRead", true); }
Napi::Value CudaStateWrite(const Napi::CallbackInfo& info) { return StateTransfer(info, "cudaStateWrite", false); }

Napi::Value CudaStateCopy(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "cudaStateCopy");
    CudaStateHandle* from = unwrap_state(a, env, "from");
    CudaStateHandle* to = unwrap_state(a, env, "to");
    if (from == to) return env.Undefined();
    if (from->conv_floats != to->conv_floats || from->ssm_floats != to->ssm_floats || from->device != to->device) {
      a.fail("from and to must be states of the same sizes on the same device");
    }
    std::scoped_lock lock(from->mutex, to->mutex);
    cudaError_t e = cudaSetDevice(from->device);
    if (e == cudaSuccess) e = cudaMemcpy(to->conv, from->conv, from->conv_floats * 4, cudaMemcpyDeviceToDevice);
    if (e == cudaSuccess) e = cudaMemcpy(to->ssm, from->ssm, from->ssm_floats * 4, cudaMemcpyDeviceToDevice);
    if (e == cudaSuccess) e = settle();
    if (e != cudaSuccess) a.fail(cuda_message("cudaMemcpy", e));
    return env.Undefined();
  });
}

// One model call on a worker thread, settling a Promise. It owns copies of the ids and lengths and
// holds the handles and the host logits buffer.
class CudaWorker : public PromiseWorker {
 public:
  CudaWorker(Napi::Env env, const char* op, const Args& a, CudaModelHandle* model, CudaStateHandle* state)
      : PromiseWorker(env, op), model_(model), state_(state) {
    hold(a.get("model"));
    ++model_->in_flight;
    if (state_) {
      hold(a.get("state"));
      ++state_->in_flight;
    }
    for (const char* out : {"logits", "tokens"}) {
      if (a.is_null(out)) continue;
      Napi::Value buffer = a.get(out);
      hold(buffer);
      (std::strcmp(out, "logits") == 0 ? host_logits_ : host_tokens_) = buffer.As<Napi::ArrayBuffer>().Data();
    }
  }

  bool step = false;
  // A sampling step: the tokens drawn on the device from the step's logits with these parameters
  // (penalty_tokens unset: the host copy is `penalty`, [batch][penalty_count]) and draws, one per row.
  bool sample = false;
  cpu::SamplingParams params;
  std::vector<int32_t> penalty;
  std::vector<float> draws;
  std::vector<int32_t> ids;
  std::vector<int64_t> lengths;
  cuda::ForwardArgs forward;
  int64_t batch = 0;
  int64_t vocab = 0;
  int64_t logit_rows = 0;

 protected:
  void Execute() override {
    std::unique_lock<std::mutex> model_lock(model_->mutex);
    std::unique_lock<std::mutex> state_lock;
    if (state_) state_lock = std::unique_lock<std::mutex>(state_->mutex);
    const std::string failure = run();
    if (!failure.empty()) SetError(std::string(op_) + ": " + failure);
  }
  void settled() override {
    end_call(model_);
    if (state_) end_call(state_);
  }

 private:
  // Device logits of at least `floats` floats: the step buffer of this batch, or the forward buffer.
  cudaError_t logits_buffer(int64_t floats, float** out) {
    if (step) {
      float*& p = model_->step_logits[batch];
      if (!p) {
        const cudaError_t e = cudaMalloc(&p, floats * sizeof(float));
        if (e != cudaSuccess) {
          p = nullptr;
          return e;
        }
      }
      *out = p;
      return cudaSuccess;
    }
    if (model_->forward_capacity < floats) {
      cudaFree(model_->forward_logits);
      model_->forward_logits = nullptr;
      model_->forward_capacity = 0;
      const cudaError_t e = cudaMalloc(&model_->forward_logits, floats * sizeof(float));
      if (e != cudaSuccess) {
        model_->forward_logits = nullptr;
        return e;
      }
      model_->forward_capacity = floats;
    }
    *out = model_->forward_logits;
    return cudaSuccess;
  }

  std::string run() {
    cudaError_t e = cudaSetDevice(model_->device);
    if (e != cudaSuccess) return cuda_message("cudaSetDevice", e);
    float* logits = nullptr;
    e = logits_buffer(logit_rows * vocab, &logits);
    if (e != cudaSuccess) return "could not allocate the logits on the device: " + cuda_message("cudaMalloc", e);
    float* host = static_cast<float*>(host_logits_);
    if (step) {
      cuda::StepArgs s;
      s.ids = ids.data();
      s.batch = batch;
      s.conv_state = state_->conv;
      s.ssm_state = state_->ssm;
      s.logits = logits;
      s.synchronize = !sample;  // a sampling step waits once, after the draw
      const cuda::Status st = model_->model->step(s);
      if (!st.ok()) {
        // Nothing the step enqueued may still run once the call has settled and its buffers may go.
        if (sample) cudaStreamSynchronize(model_->model->stream());
        return st.message;
      }
      if (sample) return draw_tokens(logits);
      e = cudaMemcpy(host, logits, batch * vocab * sizeof(float), cudaMemcpyDeviceToHost);
      return e == cudaSuccess ? "" : cuda_message("cudaMemcpy", e);
    }
    forward.ids = ids.data();
    forward.lengths = lengths.data();
    forward.logits = logits;
    if (state_) {
      forward.conv_state = state_->conv;
      forward.ssm_state = state_->ssm;
    }
    const cuda::Status st = model_->model->forward(forward);
    if (!st.ok()) return st.message;
    if (forward.padded_length > 0) {
      // Only each sequence's own rows: the padding rows of the caller's buffer stay as they were.
      for (int64_t s = 0; s < forward.sequences && e == cudaSuccess; ++s) {
        const int64_t offset = s * forward.padded_length * vocab;
        e = cudaMemcpy(host + offset, logits + offset, lengths[s] * vocab * sizeof(float), cudaMemcpyDeviceToHost);
      }
    } else {
      e = cudaMemcpy(host, logits, logit_rows * vocab * sizeof(float), cudaMemcpyDeviceToHost);
    }
    return e == cudaSuccess ? "" : cuda_message("cudaMemcpy", e);
  }

  // The sampler on the runner's stream after the step, then the tokens back to the host.
  std::string draw_tokens(const float* logits) {
    CudaModelHandle::Sampling& b = model_->sampling;
    const cudaStream_t stream = model_->model->stream();
    const int64_t count = params.penalty_count;
    // Each buffer short of what this call needs is replaced, once the stream is past any earlier use.
    bool synced = false;
    auto ensure = [&](void** p, size_t* capacity, size_t need, bool doubling) -> std::string {
      if (*capacity >= need) return "";
      if (!synced) {
        const cudaError_t e = cudaStreamSynchronize(stream);
        if (e != cudaSuccess) return cuda_message("cudaStreamSynchronize", e);
        synced = true;
      }
      const size_t bytes = doubling ? std::max(need, 2 * *capacity) : need;
      cudaFree(*p);
      *p = nullptr, *capacity = 0;
      const cudaError_t e = cudaMalloc(p, bytes);
      if (e != cudaSuccess) {
        *p = nullptr;
        return "could not allocate the sampler's buffers on the device: " + cuda_message("cudaMalloc", e);
      }
      *capacity = bytes;
      return "";
    };
    std::string failure = ensure(&b.draws, &b.draws_bytes, batch * sizeof(float), false);
    if (failure.empty()) failure = ensure(&b.tokens, &b.tokens_bytes, batch * sizeof(int32_t), false);
    if (failure.empty())
      failure = ensure(&b.penalty, &b.penalty_bytes, std::max<int64_t>(1, batch * count) * sizeof(int32_t), true);
    if (failure.empty()) failure = ensure(&b.work, &b.work_bytes, cuda::sample_workspace_bytes(batch, vocab), false);
    // Whatever happens below, the step must be finished before the call returns.
    auto finish = [&](const std::string& message) {
      const cudaError_t e = cudaStreamSynchronize(stream);
      if (!message.empty()) return message;
      return e == cudaSuccess ? std::string() : cuda_message("cudaStreamSynchronize", e);
    };
    if (!failure.empty()) return finish(failure);
    cudaError_t e = cudaMemcpyAsync(b.draws, draws.data(), batch * sizeof(float), cudaMemcpyHostToDevice, stream);
    if (e == cudaSuccess && count > 0)
      e = cudaMemcpyAsync(b.penalty, penalty.data(), batch * count * sizeof(int32_t), cudaMemcpyHostToDevice, stream);
    if (e != cudaSuccess) return finish(cuda_message("cudaMemcpyAsync", e));
    cpu::SamplingParams p = params;
    p.penalty_tokens = count > 0 ? static_cast<int32_t*>(b.penalty) : nullptr;
    const cuda::Status st = cuda::sample(logits, batch, vocab, p, static_cast<float*>(b.draws),
                                         static_cast<int32_t*>(b.tokens), b.work, stream);
    if (!st.ok()) return finish(st.message);
    e = cudaMemcpyAsync(host_tokens_, b.tokens, batch * sizeof(int32_t), cudaMemcpyDeviceToHost, stream);
    return finish(e == cudaSuccess ? "" : cuda_message("cudaMemcpyAsync", e));
  }

  CudaModelHandle* model_;
  CudaStateHandle* state_;
  void* host_logits_ = nullptr;
  void* host_tokens_ = nullptr;
};

// cudaModelForward({model, ids, lengths, lastOnly, logits, paddedLength?, state?, useInitialState?,
// segmentTokens?}): logits into the host buffer; a given state (batch = sequences) gets each
// sequence's final state.
Napi::Value CudaModelForward(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "cudaModelForward");
    CudaModelHandle* m = unwrap_model(a, env);
    const int64_t vocab = m->model->config().vocab_size;
    ForwardRequest r = read_forward_request(a, vocab);
    const int64_t sequences = (int64_t)r.lengths.size();
    a.f32_out("logits", r.logit_rows * vocab);
    CudaStateHandle* state = a.is_null("state") ? nullptr : unwrap_state(a, env, "state");
    if (state) check_state(a, *m, *state, sequences, "state");
    if (r.use_initial_state && !state) a.fail("useInitialState needs a state");
    auto* worker = new CudaWorker(env, "cudaModelForward", a, m, state);
    worker->ids = std::move(r.ids);
    worker->lengths = std::move(r.lengths);
    worker->vocab = vocab;
    worker->logit_rows = r.logit_rows;
    worker->forward.sequences = sequences;
    worker->forward.last_only = r.last_only;
    worker->forward.padded_length = r.padded_length;
    worker->forward.use_initial_state = r.use_initial_state;
    worker->forward.segment_tokens = r.segment_tokens;
    return worker->start();
  });
}

// cudaModelStep({model, ids, state, logits}): one token for each sequence of the state's batch, its
// logits into `logits`. A sampling step, cudaModelStep({model, ids, state, tokens, draws, temperature,
// topK, topP, minP, repetitionPenalty, penaltyTokens, penaltyCount}), draws the next token of each
// sequence on the device instead (the CPU sampler's rules, each row with its draw in [0, 1) and its
// penaltyCount penalty tokens) into `tokens` (int32 [batch]); the logits stay on the device.
Napi::Value CudaModelStep(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "cudaModelStep");
    CudaModelHandle* m = unwrap_model(a, env);
    const int64_t vocab = m->model->config().vocab_size;
    CudaStateHandle* state = unwrap_state(a, env, "state");
    const int64_t batch = state->batch;
    check_state(a, *m, *state, batch, "state");
    Napi::Value ids_value = a.get("ids");
    if (!ids_value.IsArrayBuffer()) a.fail("ids must be an ArrayBuffer");
    const int64_t count = (int64_t)ids_value.As<Napi::ArrayBuffer>().ByteLength() / 4;
    if (count != batch) {
      a.fail("ids hold " + std::to_string(count) + " tokens, the state " + std::to_string(batch) + " sequences");
    }
    const bool sample = !a.is_null("tokens");
    cpu::SamplingParams params;
    std::vector<float> draws;
    std::vector<int32_t> penalty;
    if (sample) {
      if (!a.is_null("logits")) a.fail("a sampling step (tokens) returns no logits: logits must be null");
      a.i32_out("tokens", batch);
      params = read_sampling_params(a, vocab, batch);
      penalty.assign(params.penalty_tokens, params.penalty_tokens + batch * params.penalty_count);
      params.penalty_tokens = nullptr;
      const float* d = a.f32("draws", batch);
      draws.assign(d, d + batch);
      for (float u : draws)
        if (!(u >= 0.0f && u < 1.0f)) a.fail("draws must be in [0, 1), got " + std::to_string(u));
    } else {
      a.f32_out("logits", batch * vocab);
    }
    std::vector<int32_t> ids = read_token_ids(a, batch, vocab);
    auto* worker = new CudaWorker(env, "cudaModelStep", a, m, state);
    worker->step = true;
    worker->sample = sample;
    worker->params = params;
    worker->penalty = std::move(penalty);
    worker->draws = std::move(draws);
    worker->ids = std::move(ids);
    worker->batch = batch;
    worker->vocab = vocab;
    worker->logit_rows = batch;
    return worker->start();
  });
}

template <typename T>
Napi::Value Release(const Napi::CallbackInfo& info, const char* op, const napi_type_tag& tag) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, op);
    T* handle = tagged_record<T>(env, info.Length() >= 1 ? info[0] : env.Undefined(), tag);
    if (!handle) a.fail("expected a handle of the kind it releases");
    release_record(handle);
    return env.Undefined();
  });
}
Napi::Value CudaModelRelease(const Napi::CallbackInfo& info) {
  return Release<CudaModelHandle>(info, "cudaModelRelease", kCudaModelTag);
}
Napi::Value CudaStateRelease(const Napi::CallbackInfo& info) {
  return Release<CudaStateHandle>(info, "cudaStateRelease", kCudaStateTag);
}

}  // namespace

void register_cuda(Napi::Env env, Napi::Object exports) {
  exports.Set("cudaInfo", Napi::Function::New(env, CudaInfo, "cudaInfo"));
  exports.Set("cudaModelCreate", Napi::Function::New(env, CudaModelCreate, "cudaModelCreate"));
  exports.Set("cudaModelInfo", Napi::Function::New(env, CudaModelInfo, "cudaModelInfo"));
  exports.Set("cudaModelForward", Napi::Function::New(env, CudaModelForward, "cudaModelForward"));
  exports.Set("cudaModelStep", Napi::Function::New(env, CudaModelStep, "cudaModelStep"));
  exports.Set("cudaModelRelease", Napi::Function::New(env, CudaModelRelease, "cudaModelRelease"));
  exports.Set("cudaStateCreate", Napi::Function::New(env, CudaStateCreate, "cudaStateCreate"));
  exports.Set("cudaStateRead", Napi::Function::New(env, CudaStateRead, "cudaStateRead"));
  exports.Set("cudaStateWrite", Napi::Function::New(env, CudaStateWrite, "cudaStateWrite"));
  exports.Set("cudaStateCopy", Napi::Function::New(env, CudaStateCopy, "cudaStateCopy"));
  exports.Set("cudaStateRelease", Napi::Function::New(env, CudaStateRelease, "cudaStateRelease"));
}

#endif

}  // namespace mssm::napi
