// The module entry point and the runtime settings: CPU level and threads.
#include "args.h"
#include "core/cpu_features.h"
#include "core/threadpool.h"
#include "cpu/kernels.h"

namespace mssm::napi {
namespace {

Napi::Value CpuInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("level", cpu_level_name(current_cpu_level()));
  o.Set("best", cpu_level_name(best_cpu_level()));
  Napi::Array supported = Napi::Array::New(env);
  uint32_t n = 0;
  for (int l = 0; l < kCpuLevelCount; ++l) {
    if (cpu_level_supported((CpuLevel)l)) supported.Set(n++, cpu_level_name((CpuLevel)l));
  }
  o.Set("supported", supported);
  o.Set("envError", cpu_level_error());
  const CpuFeatures& f = cpu_features();
  Napi::Object feats = Napi::Object::New(env);
  feats.Set("avx2", f.avx2);
  feats.Set("fma", f.fma);
  feats.Set("f16c", f.f16c);
  feats.Set("avx512f", f.avx512f);
  feats.Set("avx512bw", f.avx512bw);
  feats.Set("avx512bf16", f.avx512bf16);
  feats.Set("avx512vnni", f.avx512vnni);
  feats.Set("amxTile", f.amx_tile);
  feats.Set("amxBf16", f.amx_bf16);
  feats.Set("neon", f.neon);
  o.Set("features", feats);
  return o;
}

Napi::Value SetCpuLevel(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args args(info, "setCpuLevel");
    if (info.Length() < 1 || !info[0].IsString()) args.fail("level must be a string");
    std::string name = info[0].As<Napi::String>().Utf8Value();
    CpuLevel level;
    if (!parse_cpu_level(name, &level)) args.fail("unknown level \"" + name + "\"; expected baseline, avx2, avx512 or avx512bf16");
    if (!set_cpu_level(level)) {
      args.fail("level \"" + name + "\" is not supported by this CPU; the best it supports is " +
                cpu_level_name(best_cpu_level()));
    }
    return info.Env().Undefined();
  });
}

Napi::Value Threads(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), num_threads()); }

Napi::Value SetThreads(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    if (info.Length() < 1 || !info[0].IsNumber()) Args(info, "setThreads").fail("threads must be a number");
    double n = info[0].As<Napi::Number>().DoubleValue();
    if (!(n >= 1 && n <= 1024) || n != (double)(int)n) Args(info, "setThreads").fail("threads must be an integer in [1, 1024]");
    set_num_threads((int)n);
    return info.Env().Undefined();
  });
}

Napi::Value DefaultThreads(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), default_num_threads());
}

}  // namespace

void register_runtime(Napi::Env env, Napi::Object exports) {
  exports.Set("cpuInfo", Napi::Function::New(env, CpuInfo, "cpuInfo"));
  exports.Set("setCpuLevel", Napi::Function::New(env, SetCpuLevel, "setCpuLevel"));
  exports.Set("threads", Napi::Function::New(env, Threads, "threads"));
  exports.Set("setThreads", Napi::Function::New(env, SetThreads, "setThreads"));
  exports.Set("defaultThreads", Napi::Function::New(env, DefaultThreads, "defaultThreads"));
}

}  // namespace mssm::napi

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  mssm::napi::register_memory(env, exports);
  mssm::napi::register_runtime(env, exports);
  mssm::napi::register_ops(env, exports);
  mssm::napi::register_bench(env, exports);
  mssm::napi::register_mapfile(env, exports);
  mssm::napi::register_model(env, exports);
  mssm::napi::register_train(env, exports);
  mssm::napi::register_cuda(env, exports);
  exports.Set("abiVersion", Napi::Number::New(env, 1));
  return exports;
}

NODE_API_MODULE(mamba_ssm, Init)
