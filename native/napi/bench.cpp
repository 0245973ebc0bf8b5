// Bindings the benchmarks use to measure the machine's ceilings with the kernels' own code.
#include "args.h"
#include "cpu/kernels.h"

namespace mssm::napi {
namespace {

Napi::Value FmaPeak(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "fmaPeak");
    return Napi::Number::New(info.Env(), cpu::kernels().fma_peak(a.integer("iterations", 1, (int64_t)1 << 40)));
  });
}

Napi::Value Bf16Peak(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "bf16Peak");
    return Napi::Number::New(info.Env(), cpu::kernels().bf16_peak(a.integer("iterations", 1, (int64_t)1 << 40)));
  });
}

Napi::Value ReadSum(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "readSum");
    int64_t n = a.integer("n", 0, (int64_t)1 << 40);
    return Napi::Number::New(info.Env(), cpu::kernels().read_sum(a.f32("data", n), n));
  });
}

}  // namespace

void register_bench(Napi::Env env, Napi::Object exports) {
  exports.Set("fmaPeak", Napi::Function::New(env, FmaPeak, "fmaPeak"));
  exports.Set("bf16Peak", Napi::Function::New(env, Bf16Peak, "bf16Peak"));
  exports.Set("readSum", Napi::Function::New(env, ReadSum, "readSum"));
}

}  // namespace mssm::napi
