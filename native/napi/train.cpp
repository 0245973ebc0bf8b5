// Bindings of the trainer (native/train): a trainer handle owns the parameters, their gradients and
// AdamW's two moments, all f32 in the layout of parameter_slots(). JavaScript fills and reads them by
// copy (trainerRead / trainerWrite), runs a micro-batch's forward and backward off the event loop
// (trainerForwardBackward, a Promise), and takes an optimizer step (trainerStep). One call at a time
// per trainer: a second while one runs is refused, never raced.
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "args.h"
#include "handle.h"
#include "model/mamba_model.h"
#include "train/trainer.h"

namespace mssm::napi {
namespace {

constexpr napi_type_tag kTrainerTag = {0x6d616d62615f7373ull, 0x6d5f747261696e31ull};

struct TrainerHandle {
  std::unique_ptr<train::Trainer<float>> trainer;
  std::vector<float> m, v;
  int64_t step = 0;  // optimizer steps taken
  bool busy = false;
  bool released = false;
};

TrainerHandle* unwrap(const Args& a, Napi::Env env, Napi::Value value, bool idle = true) {
  TrainerHandle* h = tagged_record<TrainerHandle>(env, value, kTrainerTag);
  if (!h) a.fail("trainer must be a handle from trainerCreate");
  if (h->released) a.fail("the trainer has been released");
  if (idle && h->busy) a.fail("the trainer is busy with a forward/backward pass; await it first");
  return h;
}

Napi::Value TrainerCreate(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "trainerCreate");
    model::Config config = read_model_config(a, a.get("config"));
    const int64_t chunk = a.is_null("scanChunk") ? 64 : a.integer("scanChunk", 1, 1 << 20);
    auto handle = std::make_unique<TrainerHandle>();
    handle->trainer = std::make_unique<train::Trainer<float>>(config, chunk);
    if (!a.is_null("auxWeight")) {
      const double aux = a.number("auxWeight", 0.01);
      if (!(aux >= 0 && aux <= 1e6)) a.fail("auxWeight must be a number in [0, 1e6], got " + std::to_string(aux));
      handle->trainer->set_aux_weight((float)aux);
    }
    handle->m.assign((size_t)handle->trainer->parameter_count(), 0.0f);
    handle->v.assign((size_t)handle->trainer->parameter_count(), 0.0f);
    return wrap_record(a, env, std::move(handle), kTrainerTag, "trainer");
  });
}

Napi::Value TrainerSlots(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "trainerSlots");
    TrainerHandle* h = unwrap(a, env, a.get("trainer"), false);
    const auto& t = *h->trainer;
    Napi::Array out = Napi::Array::New(env, t.slots().size());
    uint32_t i = 0;
    for (const train::ParamSlot& s : t.slots()) {
      Napi::Object o = Napi::Object::New(env);
      o.Set("name", s.name);
      Napi::Array shape = Napi::Array::New(env, s.shape.size());
      for (uint32_t j = 0; j < s.shape.size(); ++j) shape.Set(j, Napi::Number::New(env, (double)s.shape[j]));
      o.Set("shape", shape);
      o.Set("offset", Napi::Number::New(env, (double)s.offset));
      o.Set("count", Napi::Number::New(env, (double)s.count));
      o.Set("decay", Napi::Boolean::New(env, s.decay));
      out.Set(i++, o);
    }
    Napi::Object r = Napi::Object::New(env);
    r.Set("slots", out);
    r.Set("floats", Napi::Number::New(env, (double)t.parameter_count()));
    r.Set("step", Napi::Number::New(env, (double)h->step));
    r.Set("activationFloatsPerToken", Napi::Number::New(env, (double)t.activation_floats_per_token()));
    r.Set("workingFloatsPerToken", Napi::Number::New(env, (double)t.working_floats_per_token()));
    return r;
  });
}

float* buffer_of(const Args& a, TrainerHandle* h, const std::string& which) {
  if (which == "params") return h->trainer->params();
  if (which == "grads") return h->trainer->grads();
  if (which == "m") return h->m.data();
  if (which == "v") return h->v.data();
  a.fail("which must be \"params\", \"grads\", \"m\" or \"v\", got \"" + which + "\"");
}

std::string string_arg(const Args& a, const char* name) {
  Napi::Value v = a.get(name);
  if (!v.IsString()) a.fail(std::string(name) + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

// trainerRead({trainer, which, out: ArrayBuffer of floats·4 bytes}) copies the whole buffer out.
Napi::Value TrainerRead(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "trainerRead");
    TrainerHandle* h = unwrap(a, info.Env(), a.get("trainer"));
    const float* src = buffer_of(a, h, string_arg(a, "which"));
    const int64_t n = h->trainer->parameter_count();
    float* out = a.f32_out("out", n);
    std::copy(src, src + n, out);
    return info.Env().Undefined();
  });
}

// trainerWrite({trainer, which, data: ArrayBuffer of floats·4 bytes}) copies the whole buffer in.
Napi::Value TrainerWrite(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "trainerWrite");
    TrainerHandle* h = unwrap(a, info.Env(), a.get("trainer"));
    float* dst = buffer_of(a, h, string_arg(a, "which"));
    const int64_t n = h->trainer->parameter_count();
    const float* data = a.f32("data", n);
    std::copy(data, data + n, dst);
    if (!a.is_null("step")) h->step = a.integer("step", 0, INT64_MAX / 2);
    return info.Env().Undefined();
  });
}

class ForwardBackwardWorker : public PromiseWorker {
 public:
  ForwardBackwardWorker(Napi::Env env, Napi::Value handle_object, TrainerHandle* handle)
      : PromiseWorker(env, "trainerForwardBackward"), handle_(handle) {
    hold(handle_object);
    handle_->busy = true;
  }
  std::vector<int32_t> ids, targets;
  int64_t batch = 0, length = 0;
  bool backward = true;
  float scale = 1.0f;

 protected:
  void Execute() override {
    try {
      result_ = handle_->trainer->forward_backward(ids.data(), targets.data(), batch, length, backward, scale);
    } catch (const std::bad_alloc&) {
      SetError("trainerForwardBackward: out of memory (a smaller batch or length needs less)");
    } catch (const std::exception& e) {
      SetError(std::string("trainerForwardBackward: ") + e.what());
    }
  }
  void settled() override { handle_->busy = false; }
  Napi::Value result() override {
    Napi::Object o = Napi::Object::New(Env());
    o.Set("sum", Napi::Number::New(Env(), result_.sum));
    o.Set("count", Napi::Number::New(Env(), (double)result_.count));
    o.Set("aux", Napi::Number::New(Env(), result_.aux));
    return o;
  }

 private:
  TrainerHandle* handle_;
  train::BatchLoss result_;
};

std::vector<int32_t> copy_i32(const Args& a, const char* name, int64_t count) {
  Napi::Value v = a.get(name);
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array) {
    a.fail(std::string(name) + " must be an Int32Array");
  }
  Napi::Int32Array arr = v.As<Napi::Int32Array>();
  if ((int64_t)arr.ElementLength() != count) {
    a.fail(std::string(name) + " holds " + std::to_string(arr.ElementLength()) + " values, expected batch · length = " +
           std::to_string(count));
  }
  return std::vector<int32_t>(arr.Data(), arr.Data() + count);
}

// trainerForwardBackward({trainer, ids: Int32Array, targets: Int32Array, batch, length, backward, lossScale})
//   → Promise<{sum, count, aux}>
Napi::Value TrainerForwardBackward(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "trainerForwardBackward");
    Napi::Value handle_value = a.get("trainer");
    TrainerHandle* h = unwrap(a, env, handle_value);
    const int64_t batch = a.integer("batch", 1, 1 << 24), length = a.integer("length", 1, 1 << 30);
    if (batch * length > ((int64_t)1 << 32)) a.fail("batch · length is too large");
    std::vector<int32_t> ids = copy_i32(a, "ids", batch * length);
    std::vector<int32_t> targets = copy_i32(a, "targets", batch * length);
    const double scale = a.number("lossScale", 1.0);
    if (!std::isfinite(scale)) a.fail("lossScale must be a finite number");
    auto* w = new ForwardBackwardWorker(env, handle_value, h);
    w->ids = std::move(ids);
    w->targets = std::move(targets);
    w->batch = batch;
    w->length = length;
    w->backward = a.boolean("backward", true);
    w->scale = (float)scale;
    return w->start();
  });
}

// trainerStep({trainer, lr, beta1, beta2, eps, weightDecay, maxGradNorm}) clips the gradients to a
// global norm of maxGradNorm (0: no clipping), takes one AdamW step and zeroes the gradients.
// Returns {gradNorm (before clipping), step}.
Napi::Value TrainerStep(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "trainerStep");
    TrainerHandle* h = unwrap(a, env, a.get("trainer"));
    train::AdamWParams p;
    auto in_range = [&](const char* name, double fallback, double lo, double hi) {
      const double v = a.number(name, fallback);
      if (!(v >= lo && v <= hi)) {
        a.fail(std::string(name) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
               std::to_string(v));
      }
      return v;
    };
    p.lr = in_range("lr", 1e-3, 0, 1e3);
    p.beta1 = in_range("beta1", 0.9, 0, 0.999999);
    p.beta2 = in_range("beta2", 0.999, 0, 0.99999999);
    p.eps = in_range("eps", 1e-8, 0, 1);
    p.weight_decay = in_range("weightDecay", 0.1, 0, 1e3);
    const double max_norm = in_range("maxGradNorm", 1.0, 0, 1e30);
    const double norm = train::optimizer_step(*h->trainer, h->m.data(), h->v.data(), p, max_norm, &h->step);
    Napi::Object o = Napi::Object::New(env);
    o.Set("gradNorm", Napi::Number::New(env, norm));
    o.Set("step", Napi::Number::New(env, (double)h->step));
    return o;
  });
}

Napi::Value TrainerZeroGrads(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "trainerZeroGrads");
    unwrap(a, info.Env(), a.get("trainer"))->trainer->zero_grads();
    return info.Env().Undefined();
  });
}

Napi::Value TrainerRelease(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "trainerRelease");
    TrainerHandle* h = unwrap(a, info.Env(), a.get("trainer"));
    h->released = true;
    h->trainer.reset();
    std::vector<float>().swap(h->m);
    std::vector<float>().swap(h->v);
    return info.Env().Undefined();
  });
}

}  // namespace

void register_train(Napi::Env env, Napi::Object exports) {
  exports.Set("trainerCreate", Napi::Function::New(env, TrainerCreate, "trainerCreate"));
  exports.Set("trainerSlots", Napi::Function::New(env, TrainerSlots, "trainerSlots"));
  exports.Set("trainerRead", Napi::Function::New(env, TrainerRead, "trainerRead"));
  exports.Set("trainerWrite", Napi::Function::New(env, TrainerWrite, "trainerWrite"));
  exports.Set("trainerForwardBackward", Napi::Function::New(env, TrainerForwardBackward, "trainerForwardBackward"));
  exports.Set("trainerStep", Napi::Function::New(env, TrainerStep, "trainerStep"));
  exports.Set("trainerZeroGrads", Napi::Function::New(env, TrainerZeroGrads, "trainerZeroGrads"));
  exports.Set("trainerRelease", Napi::Function::New(env, TrainerRelease, "trainerRelease"));
}

}  // namespace mssm::napi
