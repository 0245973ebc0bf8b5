// Bindings of the CPU kernels: each takes one object of named arguments (ArrayBuffers and sizes),
// checks every buffer against the bytes the kernel will touch, and runs the kernel of the CPU level in
// use. Shapes are validated with friendlier messages in lib/ops before these are called.
#include <string>
#include <vector>

#include "args.h"
#include "sampling_args.h"
#include "cpu/kernels.h"

namespace mssm::napi {
namespace {

using cpu::kernels;
constexpr int64_t kMaxDim = (int64_t)1 << 40;

int64_t checked_mul(const Args& a, std::initializer_list<int64_t> factors) {
  int64_t r = 1;
  for (int64_t f : factors) {
    if (f != 0 && r > kMaxDim / f) a.fail("sizes overflow");
    r *= f;
  }
  return r;
}

void require_q8_multiple(const Args& a, DType t, int64_t n, const char* what) {
  if (t == DType::q8_0 && n % kQ8BlockSize != 0) {
    a.fail(std::string(what) + " must be a multiple of 32 for q8_0, got " + std::to_string(n));
  }
  if (t == DType::i32) a.fail(std::string(what) + ": i32 is not a weight dtype");
}

Napi::Value Matmul(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "matmul");
    int64_t M = a.integer("M", 1, kMaxDim), N = a.integer("N", 1, kMaxDim), K = a.integer("K", 1, kMaxDim);
    DType wt = a.dtype("wDtype");
    require_q8_multiple(a, wt, K, "K");
    const float* x = a.f32("x", checked_mul(a, {M, K}));
    const void* w = a.buffer("w", dtype_bytes(wt, checked_mul(a, {N, K})));
    const float* bias = a.f32("bias", N, true);
    float* y = a.f32_out("y", checked_mul(a, {M, N}));
    kernels().matmul(x, w, wt, bias, y, M, N, K);
    return info.Env().Undefined();
  });
}

Napi::Value Convert(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "convert");
    int64_t n = a.integer("n", 0, kMaxDim);
    DType st = a.dtype("srcDtype"), dt = a.dtype("dstDtype");
    if ((st == DType::i32) != (dt == DType::i32)) a.fail("i32 converts only to i32");
    if (st != DType::f32 && dt != DType::f32 && st != dt) a.fail("one side of a conversion must be f32");
    if ((st == DType::q8_0 || dt == DType::q8_0) && n % kQ8BlockSize) a.fail("q8_0 needs a multiple of 32 elements");
    const void* src = a.buffer("src", dtype_bytes(st, n));
    void* dst = a.buffer("dst", dtype_bytes(dt, n));
    kernels().convert(src, st, dst, dt, n);
    return info.Env().Undefined();
  });
}

Napi::Value Rmsnorm(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "rmsnorm");
    int64_t rows = a.integer("rows", 0, kMaxDim), dim = a.integer("dim", 1, kMaxDim);
    int64_t n = checked_mul(a, {rows, dim});
    const float* x = a.f32("x", n);
    const float* residual = a.f32("residual", n, true);
    const float* weight = a.f32("weight", dim);
    float* out = a.f32_out("out", n);
    float* residual_out = a.f32_out("residualOut", n, true);
    float eps = (float)a.number("eps", 1e-5);
    kernels().rmsnorm(x, residual, weight, out, residual_out, rows, dim, eps);
    return info.Env().Undefined();
  });
}

Napi::Value GatedRmsnorm(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "gatedRmsnorm");
    int64_t rows = a.integer("rows", 0, kMaxDim), dim = a.integer("dim", 1, kMaxDim);
    int64_t group = a.integer("groupSize", 1, dim);
    if (dim % group) a.fail("dim " + std::to_string(dim) + " is not a multiple of groupSize " + std::to_string(group));
    int64_t n = checked_mul(a, {rows, dim});
    const float* x = a.f32("x", n);
    const float* z = a.f32("z", n, true);
    const float* weight = a.f32("weight", dim);
    float* out = a.f32_out("out", n);
    kernels().gated_rmsnorm(x, z, weight, out, rows, dim, group, (float)a.number("eps", 1e-5),
                            a.boolean("normBeforeGate", false));
    return info.Env().Undefined();
  });
}

Napi::Value Embedding(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "embedding");
    int64_t vocab = a.integer("vocab", 1, kMaxDim), dim = a.integer("dim", 1, kMaxDim);
    int64_t count = a.integer("count", 0, kMaxDim);
    DType t = a.dtype("dtype");
    require_q8_multiple(a, t, dim, "dim");
    const void* table = a.buffer("table", dtype_bytes(t, checked_mul(a, {vocab, dim})));
    const int32_t* ids = a.i32("ids", count);
    for (int64_t i = 0; i < count; ++i) {
      if (ids[i] < 0 || ids[i] >= vocab) {
        a.fail("token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) + " is outside [0, " +
               std::to_string(vocab) + ")");
      }
    }
    float* out = a.f32_out("out", checked_mul(a, {count, dim}));
    kernels().embedding(table, t, ids, out, count, dim);
    return info.Env().Undefined();
  });
}

Napi::Value Conv1d(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "conv1d");
    int64_t B = a.integer("batch", 1, kMaxDim), L = a.integer("length", 1, kMaxDim);
    int64_t C = a.integer("channels", 1, kMaxDim), K = a.integer("kernel", 1, 1024);
    int64_t n = checked_mul(a, {B, L, C}), ns = checked_mul(a, {B, K - 1, C});
    const float* x = a.f32("x", n);
    const float* w = a.f32("weight", checked_mul(a, {C, K}));
    const float* bias = a.f32("bias", C, true);
    const float* state_in = a.f32("stateIn", ns, true);
    float* state_out = a.f32_out("stateOut", ns, true);
    float* y = a.f32_out("y", n);
    kernels().conv1d(x, w, bias, state_in, state_out, y, B, L, C, K, a.boolean("silu", false));
    return info.Env().Undefined();
  });
}

Napi::Value Conv1dStep(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "conv1dStep");
    int64_t B = a.integer("batch", 1, kMaxDim), C = a.integer("channels", 1, kMaxDim);
    int64_t K = a.integer("kernel", 1, 1024);
    const float* x = a.f32("x", checked_mul(a, {B, C}));
    const float* w = a.f32("weight", checked_mul(a, {C, K}));
    const float* bias = a.f32("bias", C, true);
    float* state = a.f32_out("state", checked_mul(a, {B, K - 1, C}));
    float* y = a.f32_out("y", checked_mul(a, {B, C}));
    kernels().conv1d_step(x, w, bias, state, y, B, C, K, a.boolean("silu", false));
    return info.Env().Undefined();
  });
}

cpu::SelectiveScanArgs scan_args(const Args& a, bool step) {
  cpu::SelectiveScanArgs s;
  s.batch = a.integer("batch", 1, kMaxDim);
  s.length = step ? 1 : a.integer("length", 1, kMaxDim);
  s.channels = a.integer("channels", 1, kMaxDim);
  s.state = a.integer("state", 1, kMaxDim);
  s.groups = a.integer("groups", 1, s.channels);
  if (s.channels % s.groups) a.fail("channels must be a multiple of groups");
  int64_t n = checked_mul(a, {s.batch, s.length, s.channels});
  int64_t nbc = checked_mul(a, {s.batch, s.length, s.groups, s.state});
  int64_t ns = checked_mul(a, {s.batch, s.channels, s.state});
  s.u = a.f32("u", n);
  s.delta = a.f32("delta", n);
  s.A = a.f32("A", checked_mul(a, {s.channels, s.state}));
  s.B = a.f32("B", nbc);
  s.C = a.f32("C", nbc);
  s.D = a.f32("D", s.channels, true);
  s.z = a.f32("z", n, true);
  s.delta_bias = a.f32("deltaBias", s.channels, true);
  s.delta_softplus = a.boolean("deltaSoftplus", false);
  s.state_in = a.f32("stateIn", ns, !step);
  s.state_out = a.f32_out("stateOut", ns, !step);
  s.y = a.f32_out("y", n);
  return s;
}

Napi::Value SelectiveScan(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "selectiveScan");
    kernels().selective_scan(scan_args(a, false));
    return info.Env().Undefined();
  });
}

Napi::Value SelectiveStateUpdate(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "selectiveStateUpdate");
    kernels().selective_state_update(scan_args(a, true));
    return info.Env().Undefined();
  });
}

cpu::SsdArgs ssd_args(const Args& a, bool step) {
  cpu::SsdArgs s;
  s.batch = a.integer("batch", 1, kMaxDim);
  s.length = step ? 1 : a.integer("length", 1, kMaxDim);
  s.heads = a.integer("heads", 1, kMaxDim);
  s.head_dim = a.integer("headDim", 1, kMaxDim);
  s.state = a.integer("state", 1, kMaxDim);
  s.groups = a.integer("groups", 1, s.heads);
  if (s.heads % s.groups) a.fail("heads must be a multiple of groups");
  s.chunk_size = step ? 1 : a.integer("chunkSize", 1, 1 << 16);
  int64_t nx = checked_mul(a, {s.batch, s.length, s.heads, s.head_dim});
  int64_t nbc = checked_mul(a, {s.batch, s.length, s.groups, s.state});
  int64_t ns = checked_mul(a, {s.batch, s.heads, s.head_dim, s.state});
  s.x = a.f32("x", nx);
  s.dt = a.f32("dt", checked_mul(a, {s.batch, s.length, s.heads}));
  s.A = a.f32("A", s.heads);
  s.B = a.f32("B", nbc);
  s.C = a.f32("C", nbc);
  s.D = a.f32("D", s.heads, true);
  s.z = a.f32("z", nx, true);
  s.dt_bias = a.f32("dtBias", s.heads, true);
  s.dt_softplus = a.boolean("dtSoftplus", false);
  s.bf16_products = !step && a.boolean("bf16Products", false);
  s.dt_min = (float)a.number("dtMin", 0.0);
  s.dt_max = (float)a.number("dtMax", __builtin_huge_val());
  if (!(s.dt_min <= s.dt_max)) a.fail("dtMin must not exceed dtMax");
  s.state_in = a.f32("stateIn", ns, !step);
  s.state_out = a.f32_out("stateOut", ns, !step);
  s.y = a.f32_out("y", nx);
  return s;
}

Napi::Value SsdChunked(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "ssdChunked");
    kernels().ssd_chunked(ssd_args(a, false));
    return info.Env().Undefined();
  });
}

Napi::Value SsdStep(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "ssdStep");
    kernels().ssd_step(ssd_args(a, true));
    return info.Env().Undefined();
  });
}

Napi::Value MoeRoute(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "moeRoute");
    int64_t T = a.integer("tokens", 0, kMaxDim), E = a.integer("experts", 1, 1 << 20);
    int64_t k = a.integer("topK", 1, E);
    int64_t scoring = a.integer("scoring", 0, 1);
    const float* logits = a.f32("logits", checked_mul(a, {T, E}));
    float* weights = a.f32_out("weights", checked_mul(a, {T, k}));
    int32_t* indices = a.i32_out("indices", checked_mul(a, {T, k}));
    int32_t* counts = a.i32_out("counts", E);
    kernels().moe_route(logits, T, E, k, (cpu::MoeScoring)scoring, a.boolean("renormalize", false), weights, indices,
                        counts);
    return info.Env().Undefined();
  });
}

Napi::Value MoeExperts(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "moeExperts");
    cpu::MoeExpertsArgs m;
    m.tokens = a.integer("tokens", 0, kMaxDim);
    m.dim = a.integer("dim", 1, kMaxDim);
    m.hidden = a.integer("hidden", 1, kMaxDim);
    m.experts = a.integer("experts", 1, 1 << 20);
    m.top_k = a.integer("topK", 1, m.experts);
    m.fc1_dtype = a.dtype("fc1Dtype");
    m.fc2_dtype = a.dtype("fc2Dtype");
    require_q8_multiple(a, m.fc1_dtype, m.dim, "dim (fc1 input)");
    require_q8_multiple(a, m.fc2_dtype, m.hidden, "hidden (fc2 input)");
    m.x = a.f32("x", checked_mul(a, {m.tokens, m.dim}));
    m.fc1 = a.buffer("fc1", dtype_bytes(m.fc1_dtype, checked_mul(a, {m.experts, 2 * m.hidden, m.dim})));
    m.fc1_bias = a.f32("fc1Bias", checked_mul(a, {m.experts, 2 * m.hidden}), true);
    m.fc2 = a.buffer("fc2", dtype_bytes(m.fc2_dtype, checked_mul(a, {m.experts, m.dim, m.hidden})));
    m.fc2_bias = a.f32("fc2Bias", checked_mul(a, {m.experts, m.dim}), true);
    m.activation = (cpu::Activation)a.integer("activation", 0, 2);
    int64_t nk = checked_mul(a, {m.tokens, m.top_k});
    m.indices = a.i32("indices", nk);
    for (int64_t i = 0; i < nk; ++i) {
      if (m.indices[i] < 0 || m.indices[i] >= m.experts) {
        a.fail("expert index " + std::to_string(m.indices[i]) + " at " + std::to_string(i) + " is outside [0, " +
               std::to_string(m.experts) + ")");
      }
    }
    m.weights = a.f32("weights", nk);
    m.out = a.f32_out("out", checked_mul(a, {m.tokens, m.dim}));
    kernels().moe_experts(m);
    return info.Env().Undefined();
  });
}

Napi::Value Argmax(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "argmax");
    int64_t rows = a.integer("rows", 0, kMaxDim), vocab = a.integer("vocab", 1, kMaxDim);
    const float* logits = a.f32("logits", checked_mul(a, {rows, vocab}));
    int32_t* out = a.i32_out("out", rows);
    kernels().argmax(logits, rows, vocab, out);
    return info.Env().Undefined();
  });
}

// The sampler's generator state, a BigInt (u64) argument.
uint64_t read_rng_state(const Args& a) {
  Napi::Value rng = a.get("rngState");
  if (!rng.IsBigInt()) a.fail("rngState must be a BigInt");
  bool lossless = false;
  return rng.As<Napi::BigInt>().Uint64Value(&lossless);
}

// Returns the token; the generator state travels as a BigInt (u64) in and out. Or, with `draw` instead
// of rngState, the token that draw in [0, 1) picks.
Napi::Value Sample(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "sample");
    int64_t vocab = a.integer("vocab", 1, kMaxDim);
    const float* logits = a.f32("logits", vocab);
    const cpu::SamplingParams p = read_sampling_params(a, vocab, 1);
    const bool from_draw = a.is_null("rngState");
    if (!from_draw && !a.is_null("draw")) a.fail("rngState and draw exclude each other");
    uint64_t state = 0;
    float u = 0.0f;
    if (from_draw) {
      const double d = a.number("draw", -1.0);
      if (!(d >= 0.0 && d < 1.0)) a.fail("either rngState (a BigInt) or draw (a number in [0, 1)) is required");
      u = (float)d;
      if (!(u < 1.0f)) a.fail("draw " + std::to_string(d) + " rounds to 1 as a float; draws are below 1 - 2^-24");
    } else {
      state = read_rng_state(a);
      u = cpu::sampling_draw(&state);
    }
    std::vector<float> scratch((size_t)vocab * 2);
    int32_t token = kernels().sample(logits, vocab, p, u, scratch.data());
    Napi::Object out = Napi::Object::New(info.Env());
    out.Set("token", Napi::Number::New(info.Env(), token));
    if (!from_draw) out.Set("rngState", Napi::BigInt::New(info.Env(), state));
    return out;
  });
}

// samplingDraw({rngState}) → {draw, rngState}: the draw a sample() from this generator state would
// take, and the state after it (for a sampler that runs elsewhere: the GPU's).
Napi::Value SamplingDraw(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "samplingDraw");
    uint64_t state = read_rng_state(a);
    const float u = cpu::sampling_draw(&state);
    Napi::Object out = Napi::Object::New(info.Env());
    out.Set("draw", Napi::Number::New(info.Env(), u));
    out.Set("rngState", Napi::BigInt::New(info.Env(), state));
    return out;
  });
}

}  // namespace

void register_ops(Napi::Env env, Napi::Object exports) {
  struct Entry {
    const char* name;
    Napi::Value (*fn)(const Napi::CallbackInfo&);
  };
  const Entry entries[] = {
      {"matmul", Matmul},
      {"convert", Convert},
      {"rmsnorm", Rmsnorm},
      {"gatedRmsnorm", GatedRmsnorm},
      {"embedding", Embedding},
      {"conv1d", Conv1d},
      {"conv1dStep", Conv1dStep},
      {"selectiveScan", SelectiveScan},
      {"selectiveStateUpdate", SelectiveStateUpdate},
      {"ssdChunked", SsdChunked},
      {"ssdStep", SsdStep},
      {"moeRoute", MoeRoute},
      {"moeExperts", MoeExperts},
      {"argmax", Argmax},
      {"sample", Sample},
      {"samplingDraw", SamplingDraw},
  };
  for (const Entry& e : entries) exports.Set(e.name, Napi::Function::New(env, e.fn, e.name));
}

}  // namespace mssm::napi
