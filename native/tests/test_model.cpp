// The model runner against a naive reference written here: double precision, the equations of
// DESIGN.md read straight, one token at a time through the recurrence (never the chunked or batched
// paths the runner takes). Tiny random models of both architectures with awkward sizes, biases on and
// off, tied and untied heads, mixture-of-experts blocks, and f32 / bf16 / q8_0 matrices (the reference
// reads the same stored, dequantised values, so the tolerance is the runner's arithmetic alone).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <unordered_map>

#include "../model/mamba_model.h"
#include "test_util.h"

using namespace mssm;
using namespace mssm::test;
using namespace mssm::model;

namespace {

// A random model: the stored bytes the runner reads and, per weight, the values they decode to.
struct TestModel {
  Config config;
  std::unordered_map<std::string, std::vector<uint8_t>> bytes;
  std::unordered_map<std::string, std::vector<double>> values;
  std::unordered_map<std::string, Weight> weights;

  const std::vector<double>& operator[](const std::string& name) const { return values.at(name); }
  bool has(const std::string& name) const { return values.count(name) != 0; }
};

// Stores `v` as `dtype` and records what the stored bytes decode to.
void store(TestModel& m, const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v, DType dtype) {
  std::vector<uint8_t> raw;
  std::vector<double> decoded(v.size());
  const int64_t n = (int64_t)v.size();
  if (dtype == DType::f32) {
    raw.resize(n * 4);
    std::memcpy(raw.data(), v.data(), n * 4);
    for (int64_t i = 0; i < n; ++i) decoded[i] = v[i];
  } else if (dtype == DType::bf16 || dtype == DType::f16) {
    raw.resize(n * 2);
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h = dtype == DType::bf16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
      std::memcpy(raw.data() + 2 * i, &h, 2);
      decoded[i] = dtype == DType::bf16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
  } else {  // q8_0: per block of 32, scale d = max|v| / 127 stored as fp16, q = round(v / d)
    raw.resize(dtype_bytes(DType::q8_0, n));
    for (int64_t b = 0; b < n / kQ8BlockSize; ++b) {
      BlockQ8_0 block;
      float amax = 0;
      for (int j = 0; j < kQ8BlockSize; ++j) amax = std::max(amax, std::fabs(v[b * kQ8BlockSize + j]));
      block.d = f32_to_f16(amax / 127.0f);
      const float d = f16_to_f32(block.d);
      for (int j = 0; j < kQ8BlockSize; ++j) {
        float q = d > 0 ? std::round(v[b * kQ8BlockSize + j] / d) : 0.0f;
        block.qs[j] = (int8_t)std::max(-127.0f, std::min(127.0f, q));
        decoded[b * kQ8BlockSize + j] = (double)block.qs[j] * d;
      }
      std::memcpy(raw.data() + b * sizeof(BlockQ8_0), &block, sizeof(BlockQ8_0));
    }
  }
  m.bytes[name] = std::move(raw);
  m.values[name] = std::move(decoded);
  Weight w;
  w.data = m.bytes[name].data();
  w.dtype = dtype;
  w.shape = shape;
  w.bytes = (int64_t)m.bytes[name].size();
  m.weights[name] = w;
}

// Matrices are stored in `matrix_dtype` where their rows allow it (q8_0 needs rows of whole blocks of
// 32; the others fall back to bf16); every other weight is f32.
TestModel random_model(const Config& c, DType matrix_dtype, uint64_t seed) {
  TestModel m;
  m.config = c;
  Rng rng(seed);
  const int64_t d = c.hidden_size, di = c.intermediate_size, N = c.state_size, K = c.conv_kernel;
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols, float scale) {
    DType t = matrix_dtype;
    if (t == DType::q8_0 && cols % kQ8BlockSize != 0) t = DType::bf16;
    store(m, name, {rows, cols}, rng.normals(rows * cols, scale), t);
  };
  auto vector = [&](const std::string& name, std::vector<int64_t> shape, std::vector<float> v) {
    store(m, name, shape, v, DType::f32);
  };
  // dt' = softplus(dt_bias + …) around 0.01 … 0.5: the inverse softplus of such values.
  auto dt_bias = [&](int64_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = (float)std::log(std::expm1((double)rng.uniform(0.01f, 0.5f)));
    return v;
  };
  const bool m1 = c.mamba1();
  const int64_t channels = m1 ? di : di + 2 * c.num_groups * N;
  const int64_t in_rows = m1 ? 2 * di : 2 * di + 2 * c.num_groups * N + c.num_heads;
  matrix("embeddings", c.vocab_size, d, 1.0f);
  vector("norm_f", {d}, rng.uniforms(d, 0.5f, 1.5f));
  if (!c.tie_embeddings) matrix("lm_head", c.vocab_size, d, 1.0f / std::sqrt((float)d));
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    vector(p + "norm", {d}, rng.uniforms(d, 0.5f, 1.5f));
    if (c.is_moe_layer(i)) {
      // The router stays f32 (a rounded router could choose other experts than the reference);
      // the experts' matrices take matrix_dtype, fc2 falling back to bf16 when H is no multiple of 32.
      const int64_t E = c.moe.experts, Hm = c.moe.hidden;
      store(m, p + "router", {E, d}, rng.normals(E * d, 2.0f / std::sqrt((float)d)), DType::f32);
      auto expert_dtype = [&](int64_t cols) {
        return matrix_dtype == DType::q8_0 && cols % kQ8BlockSize != 0 ? DType::bf16 : matrix_dtype;
      };
      store(m, p + "fc1", {E, 2 * Hm, d}, rng.normals(E * 2 * Hm * d, 1.0f / std::sqrt((float)d)), expert_dtype(d));
      store(m, p + "fc2", {E, d, Hm}, rng.normals(E * d * Hm, 1.0f / std::sqrt((float)Hm)), expert_dtype(Hm));
      if (c.moe.bias) {
        vector(p + "router_bias", {E}, rng.normals(E, 0.2f));
        vector(p + "fc1_bias", {E, 2 * Hm}, rng.normals(E * 2 * Hm, 0.2f));
        vector(p + "fc2_bias", {E, d}, rng.normals(E * d, 0.2f));
      }
      continue;
    }
    matrix(p + "in_proj", in_rows, d, 1.0f / std::sqrt((float)d));
    if (c.use_bias) {
      vector(p + "in_proj_bias", {in_rows}, rng.normals(in_rows, 0.2f));
      vector(p + "out_proj_bias", {d}, rng.normals(d, 0.2f));
    }
    vector(p + "conv", {channels, K}, rng.normals(channels * K, 1.0f / std::sqrt((float)K)));
    if (c.use_conv_bias) vector(p + "conv_bias", {channels}, rng.normals(channels, 0.2f));
    if (m1) {
      const int64_t R = c.time_step_rank;
      matrix(p + "x_proj", R + 2 * N, di, 1.0f / std::sqrt((float)di));
      matrix(p + "dt_proj", di, R, 0.5f / std::sqrt((float)R));
      vector(p + "dt_bias", {di}, dt_bias(di));
      vector(p + "A", {di, N}, rng.uniforms(di * N, -4.0f, -0.3f));
      vector(p + "D", {di}, rng.uniforms(di, 0.5f, 1.5f));
    } else {
      vector(p + "dt_bias", {c.num_heads}, dt_bias(c.num_heads));
      vector(p + "A", {c.num_heads}, rng.uniforms(c.num_heads, -4.0f, -0.3f));
      vector(p + "D", {c.num_heads}, rng.uniforms(c.num_heads, 0.5f, 1.5f));
      vector(p + "ssm_norm", {di}, rng.uniforms(di, 0.5f, 1.5f));
    }
    matrix(p + "out_proj", d, di, 1.0f / std::sqrt((float)di));
  }
  return m;
}

// ---- The naive reference ---------------------------------------------------------------------

double silu(double v) { return v / (1.0 + std::exp(-v)); }
double softplus(double v) { return v > 20 ? v : std::log1p(std::exp(v)); }

// y[r] = Σ_k W[first + r, k] · x[k] (+ bias[first + r]) for r < count.
std::vector<double> project(const TestModel& m, const std::string& name, const std::vector<double>& x, int64_t first,
                            int64_t count, const std::string& bias = "") {
  const std::vector<double>& w = m[name];
  const int64_t cols = (int64_t)x.size();
  std::vector<double> y(count);
  for (int64_t r = 0; r < count; ++r) {
    double acc = bias.empty() || !m.has(bias) ? 0.0 : m[bias][first + r];
    for (int64_t k = 0; k < cols; ++k) acc += w[(first + r) * cols + k] * x[k];
    y[r] = acc;
  }
  return y;
}

std::vector<double> rmsnorm(const std::vector<double>& x, const std::vector<double>& weight, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double scale = 1.0 / std::sqrt(ss / x.size() + eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * scale * weight[i];
  return y;
}

// One token through the causal conv: window = the K-1 previous inputs (state) and x; the state shifts.
std::vector<double> conv_step(const TestModel& m, const std::string& p, const std::vector<double>& x, double* state) {
  const int64_t C = (int64_t)x.size(), K = m.config.conv_kernel;
  std::vector<double> y(C);
  for (int64_t c = 0; c < C; ++c) {
    double acc = m.has(p + "conv_bias") ? m[p + "conv_bias"][c] : 0.0;
    for (int64_t k = 0; k < K; ++k) acc += m[p + "conv"][c * K + k] * (k < K - 1 ? state[k * C + c] : x[c]);
    y[c] = silu(acc);
  }
  for (int64_t k = 0; k + 1 < K - 1; ++k)
    for (int64_t c = 0; c < C; ++c) state[k * C + c] = state[(k + 1) * C + c];
  if (K > 1)
    for (int64_t c = 0; c < C; ++c) state[(K - 2) * C + c] = x[c];
  return y;
}

// Mamba-1 block for one token (DESIGN.md): conv, x_proj split, Δ, the S6 recurrence, gate, out_proj.
std::vector<double> mamba1_step(const TestModel& m, const std::string& p, const std::vector<double>& hn, double* conv,
                                double* ssm) {
  const Config& c = m.config;
  const int64_t di = c.intermediate_size, N = c.state_size, R = c.time_step_rank;
  std::vector<double> x = project(m, p + "in_proj", hn, 0, di, p + "in_proj_bias");
  std::vector<double> z = project(m, p + "in_proj", hn, di, di, p + "in_proj_bias");
  x = conv_step(m, p, x, conv);
  std::vector<double> dbc = project(m, p + "x_proj", x, 0, R + 2 * N);
  std::vector<double> dt_low(dbc.begin(), dbc.begin() + R);
  std::vector<double> dt = project(m, p + "dt_proj", dt_low, 0, di);
  std::vector<double> y(di);
  for (int64_t ch = 0; ch < di; ++ch) {
    const double delta = softplus(dt[ch] + m[p + "dt_bias"][ch]);
    double out = 0;
    for (int64_t n = 0; n < N; ++n) {
      double& s = ssm[ch * N + n];
      s = std::exp(delta * m[p + "A"][ch * N + n]) * s + delta * x[ch] * dbc[R + n];
      out += s * dbc[R + N + n];
    }
    y[ch] = (out + m[p + "D"][ch] * x[ch]) * silu(z[ch]);
  }
  return project(m, p + "out_proj", y, 0, c.hidden_size, p + "out_proj_bias");
}

// Mamba-2 block for one token: z, xBC, dt; conv over xBC; per-head recurrence; gated grouped norm.
std::vector<double> mamba2_step(const TestModel& m, const std::string& p, const std::vector<double>& hn, double* conv,
                                double* ssm) {
  const Config& c = m.config;
  const int64_t di = c.intermediate_size, N = c.state_size, H = c.num_heads, P = c.head_dim, G = c.num_groups;
  const int64_t channels = di + 2 * G * N;
  std::vector<double> z = project(m, p + "in_proj", hn, 0, di, p + "in_proj_bias");
  std::vector<double> xbc = project(m, p + "in_proj", hn, di, channels, p + "in_proj_bias");
  std::vector<double> dt_raw = project(m, p + "in_proj", hn, di + channels, H, p + "in_proj_bias");
  xbc = conv_step(m, p, xbc, conv);
  const double* x = xbc.data();
  const double* B = xbc.data() + di;
  const double* C = xbc.data() + di + G * N;
  std::vector<double> y(di);
  for (int64_t h = 0; h < H; ++h) {
    const int64_t g = h / (H / G);
    double dt = softplus(dt_raw[h] + m[p + "dt_bias"][h]);
    dt = std::min(std::max(dt, (double)c.time_step_min), (double)c.time_step_max);
    const double decay = std::exp(dt * m[p + "A"][h]);
    for (int64_t q = 0; q < P; ++q) {
      double out = 0;
      for (int64_t n = 0; n < N; ++n) {
        double& s = ssm[(h * P + q) * N + n];
        s = decay * s + dt * x[h * P + q] * B[g * N + n];
        out += s * C[g * N + n];
      }
      y[h * P + q] = out + m[p + "D"][h] * x[h * P + q];
    }
  }
  // rmsnorm over groups of di/G of y ⊙ silu(z), times the norm weight
  const int64_t group = di / G;
  std::vector<double> yn(di);
  for (int64_t g = 0; g < G; ++g) {
    double ss = 0;
    for (int64_t i = g * group; i < (g + 1) * group; ++i) {
      yn[i] = y[i] * silu(z[i]);
      ss += yn[i] * yn[i];
    }
    const double scale = 1.0 / std::sqrt(ss / group + c.norm_eps);
    for (int64_t i = g * group; i < (g + 1) * group; ++i) yn[i] *= scale * m[p + "ssm_norm"][i];
  }
  return project(m, p + "out_proj", yn, 0, c.hidden_size, p + "out_proj_bias");
}

// The MoE-MLP block for one token: router scores, the top-k (ties: lower index), the weights, and the
// weighted GLU experts.
std::vector<double> moe_step(const TestModel& m, const std::string& p, const std::vector<double>& hn) {
  const model::MoeConfig& moe = m.config.moe;
  const int64_t d = (int64_t)hn.size(), E = moe.experts, Hm = moe.hidden, k = moe.top_k;
  const std::vector<double> score = reference_scores(project(m, p + "router", hn, 0, E, p + "router_bias"), moe.scoring);
  const std::vector<int32_t> order = descending(score);
  double chosen_sum = 0;
  for (int64_t j = 0; j < k; ++j) chosen_sum += score[order[j]];
  std::vector<double> out(d, 0.0);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = order[j];
    const double w = moe.renormalize ? score[e] / chosen_sum : score[e];
    std::vector<double> h(2 * Hm), g(Hm);
    for (int64_t r = 0; r < 2 * Hm; ++r) {
      double acc = moe.bias ? m[p + "fc1_bias"][e * 2 * Hm + r] : 0.0;
      for (int64_t q = 0; q < d; ++q) acc += m[p + "fc1"][(e * 2 * Hm + r) * d + q] * hn[q];
      h[r] = acc;
    }
    for (int64_t r = 0; r < Hm; ++r) g[r] = reference_activation(h[r], moe.activation) * h[Hm + r];
    for (int64_t r = 0; r < d; ++r) {
      double acc = moe.bias ? m[p + "fc2_bias"][e * d + r] : 0.0;
      for (int64_t q = 0; q < Hm; ++q) acc += m[p + "fc2"][(e * d + r) * Hm + q] * g[q];
      out[r] += w * acc;
    }
  }
  return out;
}

// One sequence's states in the runner's layout with batch 1: [layers][K-1][channels], [layers][...]
// (Mamba layers only).
struct RefState {
  std::vector<double> conv, ssm;
  explicit RefState(const Config& c)
      : conv(c.state_layers() * c.conv_state_floats(), 0.0), ssm(c.state_layers() * c.ssm_state_floats(), 0.0) {}
};

// Logits [ids.size(), vocab] of the language model, token by token, advancing `state`.
std::vector<double> reference(const TestModel& m, const std::vector<int32_t>& ids, RefState& state) {
  const Config& c = m.config;
  const int64_t d = c.hidden_size, V = c.vocab_size;
  const std::string head = c.tie_embeddings ? "embeddings" : "lm_head";
  std::vector<double> logits;
  for (int32_t id : ids) {
    std::vector<double> h(m["embeddings"].begin() + (int64_t)id * d, m["embeddings"].begin() + ((int64_t)id + 1) * d);
    std::vector<double> residual(d, 0.0);
    for (int64_t i = 0; i < c.num_layers; ++i) {
      const std::string p = "layers." + std::to_string(i) + ".";
      for (int64_t j = 0; j < d; ++j) residual[j] += h[j];
      std::vector<double> hn = rmsnorm(residual, m[p + "norm"], c.norm_eps);
      if (c.is_moe_layer(i)) {
        h = moe_step(m, p, hn);
        continue;
      }
      double* conv = state.conv.data() + c.state_index(i) * c.conv_state_floats();
      double* ssm = state.ssm.data() + c.state_index(i) * c.ssm_state_floats();
      h = c.mamba1() ? mamba1_step(m, p, hn, conv, ssm) : mamba2_step(m, p, hn, conv, ssm);
    }
    for (int64_t j = 0; j < d; ++j) residual[j] += h[j];
    std::vector<double> out = project(m, head, rmsnorm(residual, m["norm_f"], c.norm_eps), 0, V);
    logits.insert(logits.end(), out.begin(), out.end());
  }
  return logits;
}

// ---- Runner helpers --------------------------------------------------------------------------

struct RunResult {
  std::vector<float> logits, conv, ssm;
};

// forward() over `sequences` (one call), states out; optionally from given initial states.
RunResult run_forward(const Model& model, const std::vector<std::vector<int32_t>>& sequences, bool last_only = false,
                      const RunResult* initial = nullptr, int64_t segment = 0) {
  const Config& c = model.config();
  std::vector<int32_t> ids;
  std::vector<int64_t> lengths;
  for (const auto& s : sequences) {
    ids.insert(ids.end(), s.begin(), s.end());
    lengths.push_back((int64_t)s.size());
  }
  const int64_t batch = (int64_t)sequences.size();
  RunResult r;
  r.logits.assign((last_only ? batch : (int64_t)ids.size()) * c.vocab_size, NAN);
  r.conv = initial ? initial->conv : std::vector<float>(model.conv_state_floats(batch), NAN);
  r.ssm = initial ? initial->ssm : std::vector<float>(model.ssm_state_floats(batch), NAN);
  ForwardArgs a;
  a.ids = ids.data();
  a.lengths = lengths.data();
  a.sequences = batch;
  a.last_only = last_only;
  a.logits = r.logits.data();
  a.conv_state = r.conv.data();
  a.ssm_state = r.ssm.data();
  a.use_initial_state = initial != nullptr;
  a.segment_tokens = segment;
  model.forward(a);
  return r;
}

std::vector<int32_t> random_ids(Rng& rng, int64_t n, int64_t vocab) {
  std::vector<int32_t> ids(n);
  for (auto& id : ids) id = (int32_t)(rng.next() % (uint64_t)vocab);
  return ids;
}

template <typename T>
std::vector<T> slice(const std::vector<T>& v, int64_t begin, int64_t count) {
  return std::vector<T>(v.begin() + begin, v.begin() + begin + count);
}

// Sequence b's state out of a [layers][batch][per] buffer.
std::vector<float> sequence_state(const std::vector<float>& all, int64_t layers, int64_t batch, int64_t b, int64_t per) {
  std::vector<float> out;
  for (int64_t l = 0; l < layers; ++l) {
    auto first = all.begin() + (l * batch + b) * per;
    out.insert(out.end(), first, first + per);
  }
  return out;
}

// Whether the level in use rounds activations for the case's matrices: the avx512bf16 level's bf16
// products round x to bf16 (prefill), and its q8_0 products in a step (matmul_step, few rows of x)
// quantise x to 8 bits. Results then differ between paths (prefill, step, segments) by that rounding,
// not by the order of fp32 sums, and are checked by the error's RMS and maximum against the values'
// RMS: a wrong token, state or weight row is off by about 1. Measured on these cases, bf16: at most
// 6.6e-3 and 3.6e-2 (Mamba-2, whose SSD chunk products round too); q8_0 steps: 1.9e-2 and 0.2 (the
// largest in an SSM state, which sums many steps' rounding). The limits are about twice that.
bool g_rounds_activations = false;  // bf16 matrices: every path
bool g_step_rounds = false;         // q8_0: steps

template <typename T>
void expect_near_rms(const char* what, const std::vector<float>& got, const std::vector<T>& want, double rms_limit,
                     double max_limit) {
  MSSM_CHECK(got.size() == want.size(), "%s: %zu values, want %zu", what, got.size(), want.size());
  expect_rms_close(what, got.data(), want.data(), (int64_t)want.size(), rms_limit, max_limit);
}

// fp32 against the float64 reference through a few layers: 1e-4 relative, floor 0.1·RMS of the reference.
void expect_matches_reference(const char* what, const std::vector<float>& got, const std::vector<double>& want) {
  if (g_rounds_activations) return expect_near_rms(what, got, want, 1.2e-2, 6e-2);
  MSSM_CHECK(got.size() == want.size(), "%s: %zu values, want %zu", what, got.size(), want.size());
  expect_close(what, got.data(), want.data(), (int64_t)want.size(), 1e-4, 0.1 * rms(want.data(), (int64_t)want.size()));
}

// Two runner results that should agree up to the order of fp32 sums.
void expect_same(const char* what, const std::vector<float>& got, const std::vector<float>& want, double rel) {
  if (g_rounds_activations) return expect_near_rms(what, got, want, 1.2e-2, 6e-2);
  MSSM_CHECK(got.size() == want.size(), "%s: %zu values, want %zu", what, got.size(), want.size());
  expect_close(what, got.data(), want.data(), (int64_t)want.size(), rel, 0.1 * rms(want.data(), (int64_t)want.size()));
}

// A step's result against the forward's.
void expect_step_same(const char* what, const std::vector<float>& got, const std::vector<float>& want, double rel) {
  if (g_step_rounds) return expect_near_rms(what, got, want, 4e-2, 0.4);
  expect_same(what, got, want, rel);
}

struct Case {
  const char* name;
  Config config;
  DType matrix_dtype;
};

void check_case(const Case& tc, uint64_t seed) {
  const Config& c = tc.config;
  TestModel m = random_model(c, tc.matrix_dtype, seed);
  Model model(c, m.weights);
  Rng rng(seed * 7 + 1);
  const int64_t L = 11, layers = c.state_layers(), V = c.vocab_size;
  const int64_t conv_per = c.conv_state_floats(), ssm_per = c.ssm_state_floats();
  const std::vector<int32_t> a = random_ids(rng, L, V), b = random_ids(rng, L, V);
  const std::string label = std::string(tc.name) + " [" + cpu::kernels().level + "]";
  const bool rounding_level = std::string(cpu::kernels().level) == "avx512bf16";
  g_rounds_activations = rounding_level && tc.matrix_dtype != DType::f32;  // (q8_0 cases hold bf16 matrices too)
  g_step_rounds = rounding_level && tc.matrix_dtype == DType::q8_0;
  auto what = [&](const char* check) { return label + ": " + check; };

  // 1. forward of one sequence == the reference, logits at every position and the final states.
  RefState ref_state(c);
  const std::vector<double> ref_logits = reference(m, a, ref_state);
  const RunResult whole = run_forward(model, {a});
  expect_matches_reference(what("forward logits vs reference").c_str(), whole.logits, ref_logits);
  expect_matches_reference(what("forward conv state vs reference").c_str(), whole.conv, ref_state.conv);
  expect_matches_reference(what("forward ssm state vs reference").c_str(), whole.ssm, ref_state.ssm);

  // 2. step, batched over two sequences (M = 2 matmuls, one-step kernels) == forward of each alone.
  const RunResult whole_b = run_forward(model, {b});
  std::vector<float> conv(model.conv_state_floats(2), 0.0f), ssm(model.ssm_state_floats(2), 0.0f);
  std::vector<float> stepped_a, stepped_b, logits(2 * V);
  for (int64_t t = 0; t < L; ++t) {
    int32_t ids[2] = {a[t], b[t]};
    StepArgs s;
    s.ids = ids;
    s.batch = 2;
    s.conv_state = conv.data();
    s.ssm_state = ssm.data();
    s.logits = logits.data();
    model.step(s);
    stepped_a.insert(stepped_a.end(), logits.begin(), logits.begin() + V);
    stepped_b.insert(stepped_b.end(), logits.begin() + V, logits.end());
  }
  expect_step_same(what("step logits (sequence 0 of 2) == forward").c_str(), stepped_a, whole.logits, 1e-4);
  expect_step_same(what("step logits (sequence 1 of 2) == forward").c_str(), stepped_b, whole_b.logits, 1e-4);
  expect_step_same(what("step ssm state == forward").c_str(), sequence_state(ssm, layers, 2, 1, ssm_per), whole_b.ssm, 1e-4);
  expect_step_same(what("step conv state == forward").c_str(), sequence_state(conv, layers, 2, 0, conv_per), whole.conv, 1e-5);

  // 2b. step, batched over 16 sequences (the many-row products: q8_0 in bf16 at avx512bf16) == forward of
  // each alone, over a few tokens.
  {
    const int64_t S = 16, T = 4;
    std::vector<std::vector<int32_t>> seqs;
    for (int64_t q = 0; q < S; ++q) seqs.push_back(random_ids(rng, T, V));
    std::vector<float> conv16(model.conv_state_floats(S), 0.0f), ssm16(model.ssm_state_floats(S), 0.0f);
    std::vector<float> logits16(S * V);
    std::vector<std::vector<float>> stepped(S);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> ids(S);
      for (int64_t q = 0; q < S; ++q) ids[q] = seqs[q][t];
      StepArgs s;
      s.ids = ids.data();
      s.batch = S;
      s.conv_state = conv16.data();
      s.ssm_state = ssm16.data();
      s.logits = logits16.data();
      model.step(s);
      for (int64_t q = 0; q < S; ++q)
        stepped[q].insert(stepped[q].end(), logits16.begin() + q * V, logits16.begin() + (q + 1) * V);
    }
    for (int64_t q = 0; q < S; q += 5) {
      const std::string check = "step logits (sequence " + std::to_string(q) + " of 16) == forward";
      expect_step_same(what(check.c_str()).c_str(), stepped[q], run_forward(model, {seqs[q]}).logits, 1e-4);
    }
  }

  // 3. two sequences of different lengths in one call == each alone (logits and states).
  const std::vector<int32_t> b_short = slice(b, 0, 6);
  const RunResult both = run_forward(model, {a, b_short});
  const RunResult alone_b = run_forward(model, {b_short});
  expect_same(what("two sequences: first == alone").c_str(), slice(both.logits, 0, L * V), whole.logits, 1e-6);
  expect_same(what("two sequences: second == alone").c_str(), slice(both.logits, L * V, 6 * V), alone_b.logits, 1e-6);
  expect_same(what("two sequences: conv state of the second").c_str(), sequence_state(both.conv, layers, 2, 1, conv_per),
              alone_b.conv, 1e-6);
  expect_same(what("two sequences: ssm state of the first").c_str(), sequence_state(both.ssm, layers, 2, 0, ssm_per),
              whole.ssm, 1e-6);
  {
    // Logits padded to [sequences, L, vocab]: the same rows, and the rows past the short one's end untouched.
    std::vector<int32_t> ids = a;
    ids.insert(ids.end(), b_short.begin(), b_short.end());
    const int64_t lengths[2] = {L, 6};
    std::vector<float> padded(2 * L * V, 12345.0f);
    ForwardArgs f;
    f.ids = ids.data();
    f.lengths = lengths;
    f.sequences = 2;
    f.logits = padded.data();
    f.padded_length = L;
    model.forward(f);
    expect_same(what("padded logits: first").c_str(), slice(padded, 0, L * V), whole.logits, 1e-6);
    expect_same(what("padded logits: second").c_str(), slice(padded, L * V, 6 * V), alone_b.logits, 1e-6);
    bool untouched = true;
    for (int64_t i = (L + 6) * V; i < 2 * L * V; ++i) untouched = untouched && padded[i] == 12345.0f;
    MSSM_CHECK(untouched, "%s: padded rows past the end were written", label.c_str());
  }
  const RunResult last = run_forward(model, {a, b_short}, true);
  expect_same(what("lastOnly == the last rows").c_str(), last.logits,
              [&] {
                std::vector<float> v = slice(whole.logits, (L - 1) * V, V);
                std::vector<float> w = slice(alone_b.logits, 5 * V, V);
                v.insert(v.end(), w.begin(), w.end());
                return v;
              }(),
              1e-5);

  // 4. a sequence split in two, the second part from the first part's states == the whole. Split
  //    points below K-1 leave the conv state partly from the initial zeros. Split points move the SSD's
  //    chunk boundaries, so the fp32 sums differ; an MoE block's GLU products enlarge that difference
  //    (measured up to 2e-5 relative with MoE blocks, within 1e-5 without).
  const double split_rel = c.moe.layers.empty() ? 1e-5 : 5e-5;
  for (int64_t split : {1, 2, 5}) {
    const RunResult first = run_forward(model, {slice(a, 0, split)});
    const RunResult rest = run_forward(model, {slice(a, split, L - split)}, false, &first);
    const std::string at = " (split at " + std::to_string(split) + ")";
    expect_same(what(("states in: logits" + at).c_str()).c_str(), rest.logits, slice(whole.logits, split * V, (L - split) * V),
                split_rel);
    expect_same(what(("states in: ssm state" + at).c_str()).c_str(), rest.ssm, whole.ssm, 1e-5);
    expect_same(what(("states in: conv state" + at).c_str()).c_str(), rest.conv, whole.conv, 1e-5);
  }
  // Segments (a long prefill cut into passes, states carried) give the same result.
  for (int64_t segment : {1, 4}) {
    const RunResult seg = run_forward(model, {a, b_short}, false, nullptr, segment);
    expect_same(what(("segments of " + std::to_string(segment)).c_str()).c_str(), seg.logits, both.logits, split_rel);
  }
}

Config mamba1(int64_t d, int64_t layers, int64_t vocab, int64_t di, int64_t N, int64_t K, int64_t R, bool bias,
              bool conv_bias, bool tied) {
  Config c;
  c.architecture = Architecture::mamba1;
  c.hidden_size = d;
  c.num_layers = layers;
  c.vocab_size = vocab;
  c.intermediate_size = di;
  c.state_size = N;
  c.conv_kernel = K;
  c.time_step_rank = R;
  c.use_bias = bias;
  c.use_conv_bias = conv_bias;
  c.tie_embeddings = tied;
  return c;
}

Config mamba2(int64_t d, int64_t layers, int64_t vocab, int64_t H, int64_t P, int64_t G, int64_t N, int64_t K,
              int64_t chunk, bool bias, bool conv_bias, bool tied, float dt_min = 0.0f,
              float dt_max = __builtin_huge_valf()) {
  Config c;
  c.architecture = Architecture::mamba2;
  c.hidden_size = d;
  c.num_layers = layers;
  c.vocab_size = vocab;
  c.num_heads = H;
  c.head_dim = P;
  c.intermediate_size = H * P;
  c.num_groups = G;
  c.state_size = N;
  c.conv_kernel = K;
  c.chunk_size = chunk;
  c.use_bias = bias;
  c.use_conv_bias = conv_bias;
  c.tie_embeddings = tied;
  c.time_step_min = dt_min;
  c.time_step_max = dt_max;
  return c;
}

// `c` with MoE blocks.
Config with_moe(Config c, const MoeConfig& moe) {
  c.moe = moe;
  return c;
}

// Expects `body` to throw an exception whose message contains `needle`.
template <typename F>
void expect_error(const char* what, const std::string& needle, F&& body) {
  try {
    body();
    MSSM_CHECK(false, "%s: no error thrown", what);
  } catch (const std::exception& e) {
    MSSM_CHECK(std::string(e.what()).find(needle) != std::string::npos, "%s: message \"%s\" lacks \"%s\"", what,
               e.what(), needle.c_str());
  }
}

void check_errors() {
  const Config c = mamba1(13, 2, 29, 22, 5, 4, 3, true, true, false);
  TestModel m = random_model(c, DType::f32, 5);
  {
    auto w = m.weights;
    w["layers.1.x_proj"].shape = {11, 21};
    expect_error("wrong shape", "weight \"layers.1.x_proj\": expected shape [13, 22], got [11, 21]",
                 [&] { Model(c, w); });
  }
  {
    auto w = m.weights;
    w.erase("layers.0.conv_bias");
    expect_error("missing weight", "missing weight \"layers.0.conv_bias\"", [&] { Model(c, w); });
  }
  {
    auto w = m.weights;
    w["layers.0.ssm_norm"] = w["norm_f"];
    expect_error("unexpected weight", "unexpected weight \"layers.0.ssm_norm\"", [&] { Model(c, w); });
  }
  {
    auto w = m.weights;
    w["layers.0.D"].dtype = DType::bf16;
    expect_error("vector in bf16", "weight \"layers.0.D\": expected f32", [&] { Model(c, w); });
  }
  {
    auto w = m.weights;
    w["layers.0.in_proj"].dtype = DType::q8_0;
    expect_error("q8_0 rows of 13", "weight \"layers.0.in_proj\": q8_0 rows hold whole blocks", [&] { Model(c, w); });
  }
  {
    auto w = m.weights;
    w["norm_f"].bytes -= 4;
    expect_error("short buffer", "weight \"norm_f\": f32 [13] needs 52 bytes, got 48", [&] { Model(c, w); });
  }
  {
    Config bad = mamba2(12, 1, 23, 6, 3, 4, 5, 4, 3, false, true, true);
    expect_error("heads not a multiple of groups", "numHeads 6 must be a multiple of numGroups 4",
                 [&] { validate_config(bad); });
  }
  {
    using cpu::Activation;
    using cpu::MoeScoring;
    const Config base = mamba1(13, 3, 29, 22, 5, 4, 3, false, true, true);
    expect_error("moe layer out of range", "moe.layers holds 3, outside the layers [0, 3)", [&] {
      validate_config(with_moe(base, {{1, 3}, 4, 2, 8, MoeScoring::softmax, true, Activation::silu, false}));
    });
    expect_error("moe layers not increasing", "moe.layers must be strictly increasing", [&] {
      validate_config(with_moe(base, {{2, 1}, 4, 2, 8, MoeScoring::softmax, true, Activation::silu, false}));
    });
    expect_error("every layer moe", "at least one must be a Mamba layer", [&] {
      validate_config(with_moe(base, {{0, 1, 2}, 4, 2, 8, MoeScoring::softmax, true, Activation::silu, false}));
    });
    expect_error("topK above experts", "moe.topK 5 exceeds moe.numExperts 4", [&] {
      validate_config(with_moe(base, {{1}, 4, 5, 8, MoeScoring::softmax, true, Activation::silu, false}));
    });
    const Config moe = with_moe(base, {{1}, 4, 2, 8, MoeScoring::softmax, true, Activation::silu, false});
    TestModel mm = random_model(moe, DType::f32, 9);
    auto w = mm.weights;
    w["layers.1.fc2"].shape = {4, 8, 13};
    expect_error("expert weight shape", "weight \"layers.1.fc2\": expected shape [4, 13, 8], got [4, 8, 13]",
                 [&] { Model(moe, w); });
    w = mm.weights;
    w["layers.1.in_proj"] = w["layers.0.in_proj"];
    expect_error("mamba weight in a moe layer", "unexpected weight \"layers.1.in_proj\"", [&] { Model(moe, w); });
    MSSM_CHECK(Model(moe, mm.weights).conv_state_floats(3) == 2 * 3 * moe.conv_state_floats(),
               "moe: the state holds the two Mamba layers only");
  }
  Model model(c, m.weights);
  std::vector<int32_t> ids = {3, 29, 1};
  int64_t length = 3;
  std::vector<float> logits(3 * c.vocab_size);
  ForwardArgs a;
  a.ids = ids.data();
  a.lengths = &length;
  a.sequences = 1;
  a.logits = logits.data();
  expect_error("token id out of range", "token id 29 at position 1 is outside the vocabulary [0, 29)",
               [&] { model.forward(a); });
  ids[1] = 0;
  a.use_initial_state = true;
  expect_error("initial state without states", "useInitialState needs both", [&] { model.forward(a); });
}

}  // namespace

int main() {
  const Case cases[] = {
      {"mamba1 f32, biases, untied", mamba1(13, 3, 29, 22, 5, 4, 3, true, true, false), DType::f32},
      {"mamba1 f32, no biases, tied, K 3", mamba1(11, 2, 17, 18, 3, 3, 2, false, false, true), DType::f32},
      {"mamba1 q8_0/bf16, biases, untied", mamba1(32, 2, 21, 64, 4, 4, 3, true, true, false), DType::q8_0},
      {"mamba2 f32, G 2, biases, untied", mamba2(12, 2, 23, 6, 3, 2, 5, 4, 3, true, true, false), DType::f32},
      {"mamba2 f32, G 1, dt clamp, tied, K 2", mamba2(10, 2, 19, 4, 5, 1, 4, 2, 4, false, false, true, 0.05f, 0.4f),
       DType::f32},
      {"mamba2 bf16, G 2, tied", mamba2(14, 2, 17, 4, 4, 2, 3, 4, 5, false, true, true), DType::bf16},
      {"mamba2 q8_0, G 2, untied", mamba2(32, 2, 23, 4, 8, 2, 4, 4, 4, true, true, false), DType::q8_0},
      // MoE blocks (BlackMamba): between Mamba layers, or first (so their router reads the embeddings
      // exactly where the matrices round activations).
      {"mamba1 + moe f32, top-2 softmax, biases",
       with_moe(mamba1(13, 4, 29, 22, 5, 4, 3, false, true, true), {{1, 3}, 5, 2, 7, cpu::MoeScoring::softmax, true,
                cpu::Activation::silu, true}),
       DType::f32},
      {"mamba2 + moe f32, top-1 sigmoid gelu",
       with_moe(mamba2(12, 3, 23, 6, 3, 2, 5, 4, 3, true, true, false), {{1}, 3, 1, 9, cpu::MoeScoring::sigmoid, false,
                cpu::Activation::gelu, false}),
       DType::f32},
      {"mamba1 + moe bf16, first layer, top-3 gelu_tanh",
       with_moe(mamba1(14, 3, 19, 20, 4, 4, 2, false, true, false), {{0}, 4, 3, 6, cpu::MoeScoring::softmax, false,
                cpu::Activation::gelu_tanh, true}),
       DType::bf16},
      {"mamba2 + moe q8_0, first layer, top-2",
       with_moe(mamba2(32, 3, 23, 4, 8, 2, 4, 4, 4, false, true, true), {{0}, 3, 2, 32, cpu::MoeScoring::softmax, true,
                cpu::Activation::silu, false}),
       DType::q8_0},
  };
  const CpuLevel initial = current_cpu_level();
  uint64_t seed = 100;
  for (const Case& tc : cases) {
    ++seed;
    for (int l = 0; l < kCpuLevelCount; ++l) {
      if (!set_cpu_level((CpuLevel)l)) continue;
      check_case(tc, seed);
    }
  }
  set_cpu_level(initial);
  // Single-threaded too (the pool splits rows differently).
  const int threads = num_threads();
  set_num_threads(1);
  check_case(cases[0], 7);
  check_case(cases[3], 8);
  check_case(cases[7], 9);
  set_num_threads(threads);
  check_errors();
  return finish("test_model");
}
