// Native records behind plain JavaScript objects (a model, a trainer, a device model or state), and
// the worker that runs a call on them off the event loop. Shared by native/napi/model.cpp, train.cpp
// and cuda.cpp.
//
// The object is tagged with its kind, so a stray object is refused rather than unwrapped, and wraps
// the record, which the GC finaliser deletes. A call still running holds a reference to the object, so
// that never happens mid-call. Records that calls use off the thread count them (in_flight) and are
// released through release_record: their resources go at once, or when the last such call ends.
#pragma once
#include <memory>
#include <vector>

#include "args.h"

namespace mssm::napi {

template <typename T>
void delete_record(napi_env, void* data, void*) {
  delete static_cast<T*>(data);
}

// A new object of this tag wrapping `record`; `what` names it in the error when wrapping fails.
template <typename T>
Napi::Object wrap_record(const Args& a, Napi::Env env, std::unique_ptr<T> record, const napi_type_tag& tag,
                         const char* what) {
  Napi::Object object = Napi::Object::New(env);
  napi_type_tag_object(env, object, &tag);
  T* raw = record.release();
  if (napi_wrap(env, object, raw, delete_record<T>, nullptr, nullptr) != napi_ok) {
    delete raw;
    a.fail(std::string("could not wrap the ") + what + " handle");
  }
  return object;
}

// The record behind `value` when it is an object of this tag, else null.
template <typename T>
T* tagged_record(Napi::Env env, Napi::Value value, const napi_type_tag& tag) {
  bool tagged = false;
  if (value.IsObject()) napi_check_object_type_tag(env, value, &tag, &tagged);
  if (!tagged) return nullptr;
  void* data = nullptr;
  napi_unwrap(env, value, &data);
  return static_cast<T*>(data);
}

// For records with `released`, `in_flight` and drop(): marks the record released and drops its
// resources now, or leaves that to the last call using it (PromiseWorker::settled of its caller).
template <typename T>
void release_record(T* record) {
  if (!record || record->released) return;
  record->released = true;
  if (record->in_flight == 0) record->drop();
}

// Ends one call's use of a record: drops it when it was released meanwhile and this was the last call.
template <typename T>
void end_call(T* record) {
  if (--record->in_flight == 0 && record->released) record->drop();
}

// Runs one call on a worker thread and settles a Promise. Until it settles it holds references to the
// objects it uses (handles, buffers) and pins the ArrayBuffers among them, which free() then refuses.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  PromiseWorker(Napi::Env env, const char* op)
      : Napi::AsyncWorker(env, op), op_(op), deferred_(Napi::Promise::Deferred::New(env)) {}

  // Holds `value` (if it is an object) until the call settles, pinning it if it is an ArrayBuffer.
  void hold(Napi::Value value) {
    if (!value.IsObject()) return;
    refs_.push_back(Napi::Persistent(value.As<Napi::Object>()));
    if (value.IsArrayBuffer()) {
      const void* data = value.As<Napi::ArrayBuffer>().Data();
      pin_buffer(data);
      pinned_.push_back(data);
    }
  }

  // Queues the work and returns its Promise.
  Napi::Promise start() {
    Napi::Promise p = deferred_.Promise();
    Queue();
    return p;
  }

 protected:
  // On the JavaScript thread, before the Promise settles: the subclass ends its use of its records.
  virtual void settled() {}
  // What the Promise resolves to (on the JavaScript thread, after settled()).
  virtual Napi::Value result() { return Env().Undefined(); }

  void OnOK() override {
    finish();
    deferred_.Resolve(result());
  }
  void OnError(const Napi::Error& error) override {
    finish();
    deferred_.Reject(error.Value());
  }

  const char* op_;

 private:
  void finish() {
    settled();
    for (const void* p : pinned_) unpin_buffer(p);
    pinned_.clear();
    refs_.clear();
  }

  Napi::Promise::Deferred deferred_;
  std::vector<Napi::ObjectReference> refs_;
  std::vector<const void*> pinned_;
};

}  // namespace mssm::napi
