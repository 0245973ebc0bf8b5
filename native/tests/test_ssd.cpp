// Mamba-2 SSD kernels (ssd_chunked, ssd_step) against the recurrence of kernels.h evaluated in
// double, at every CPU level and at 1 and N threads:
//   - ssd_chunked over a covering set of chunk sizes, lengths, heads/groups, head_dim, state, batch
//     and options (D, z, dt_bias, softplus, dt clamp, state_in null/given, state_out aliasing),
//     including lengths around the chunks (63, 65, 257, 513), chunk sizes that do not divide them,
//     head_dim and state off the kernel's register blocks, and sequences long enough for several
//     windows of chunks;
//   - model-like inputs (mamba2-130m head shape, realistic dt' and A, 513 tokens) at chunk sizes 32
//     to 256;
//   - the duality: ssd_chunked == ssd_step token by token == the Mamba-1 selective scan with
//     A[d, n] = A[h(d)], delta[d] = dt[h(d)], D[d] = D[h(d)];
//   - a sequence split into two calls with the state carried == one call.
//
// Tolerance: |got - want| ≤ 1e-5·(|want| + floor), floor = 0.5·RMS of want over the element's own
// (batch, head) slice. Each output sums up to N·(decay window) fp32 products, and the state itself is
// built by fp32 rounding of dt', exp(dt'·A) and the updates: the plain fp32 recurrence (ssd_step,
// and the selective scan) already lands at 1-3e-6 of the head's RMS away from the double reference
// on its worst elements, and the chunked form lands at the same place. A floor of 1e-6·RMS (as first
// proposed) fails for every implementation on elements that cancel to near zero, hence a floor at
// the head's RMS scale. A deliberately wrong reference (A of one head off by 0.1%) is checked to be
// rejected by a wide margin; its smallest error is printed.
#include <cstring>

#include "test_util.h"

using namespace mssm;
using namespace mssm::test;

namespace {

constexpr double kRelTol = 1e-5;
constexpr double kFloorOfRms = 0.5;

struct Shape {
  int64_t batch, length, heads, head_dim, state, groups, chunk;
};

struct Options {
  bool D = true, z = true, bias = true, softplus = true, clamp = false, state_in = true, alias = false;
};

// Inputs of one SSD call, in the layouts of SsdArgs.
struct Inputs {
  Shape s;
  Options o;
  std::vector<float> x, dt, A, B, C, D, z, bias, state;
  float dt_min = 0.0f, dt_max = INFINITY;
};

// Realistic magnitudes: A = -exp(U(-1, 2)), dt before softplus ~ U(-4, 1), x, B, C, z, D ~ N(0, 1).
Inputs make_inputs(const Shape& s, const Options& o, uint64_t seed) {
  Rng rng(seed);
  Inputs in;
  in.s = s;
  in.o = o;
  const size_t tokens = (size_t)(s.batch * s.length);
  in.x = rng.normals(tokens * s.heads * s.head_dim);
  // Without softplus dt' must already be a step size: positive.
  in.dt = o.softplus ? rng.uniforms(tokens * s.heads, -4.0f, 1.0f) : rng.uniforms(tokens * s.heads, 0.005f, 0.8f);
  in.A.resize(s.heads);
  for (auto& a : in.A) a = -std::exp(rng.uniform(-1.0f, 2.0f));
  in.B = rng.normals(tokens * s.groups * s.state);
  in.C = rng.normals(tokens * s.groups * s.state);
  if (o.D) in.D = rng.normals(s.heads);
  if (o.z) in.z = rng.normals(tokens * s.heads * s.head_dim);
  if (o.bias) in.bias = rng.uniforms(s.heads, -1.0f, 0.5f);
  if (o.state_in) in.state = rng.normals((size_t)(s.batch * s.heads * s.head_dim * s.state));
  if (o.clamp) {  // tight enough that both ends bind for some tokens
    in.dt_min = 0.02f;
    in.dt_max = 0.3f;
  }
  return in;
}

const float* or_null(const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); }

cpu::SsdArgs args_for(const Inputs& in, float* y, const float* state_in, float* state_out) {
  cpu::SsdArgs a;
  a.batch = in.s.batch;
  a.length = in.s.length;
  a.heads = in.s.heads;
  a.head_dim = in.s.head_dim;
  a.state = in.s.state;
  a.groups = in.s.groups;
  a.chunk_size = in.s.chunk;
  a.x = in.x.data();
  a.dt = in.dt.data();
  a.A = in.A.data();
  a.B = in.B.data();
  a.C = in.C.data();
  a.D = or_null(in.D);
  a.z = or_null(in.z);
  a.dt_bias = or_null(in.bias);
  a.dt_softplus = in.o.softplus;
  a.dt_min = in.dt_min;
  a.dt_max = in.dt_max;
  a.state_in = state_in;
  a.state_out = state_out;
  a.y = y;
  return a;
}

// The recurrence of kernels.h, token by token, in double. a_scale multiplies A of head 0 (1 for the
// true reference; other values build a deliberately wrong one).
void reference(const Inputs& in, std::vector<double>& y, std::vector<double>& state, double a_scale = 1.0) {
  const Shape& s = in.s;
  const int64_t H = s.heads, P = s.head_dim, N = s.state, G = s.groups, L = s.length;
  y.assign((size_t)(s.batch * L * H * P), 0.0);
  state.assign((size_t)(s.batch * H * P * N), 0.0);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / G);
      double* st = &state[(size_t)((b * H + h) * P * N)];
      if (!in.state.empty())
        for (int64_t e = 0; e < P * N; ++e) st[e] = in.state[(size_t)((b * H + h) * P * N + e)];
      const double A = in.A[h] * (h == 0 ? a_scale : 1.0);
      for (int64_t t = 0; t < L; ++t) {
        double dt = in.dt[(size_t)((b * L + t) * H + h)] + (in.bias.empty() ? 0.0 : in.bias[h]);
        if (in.o.softplus) dt = dt > 20.0 ? dt : std::log1p(std::exp(dt));
        dt = std::min(std::max(dt, (double)in.dt_min), (double)in.dt_max);
        const double decay = std::exp(dt * A);
        const float* Bt = &in.B[(size_t)(((b * L + t) * G + g) * N)];
        const float* Ct = &in.C[(size_t)(((b * L + t) * G + g) * N)];
        for (int64_t p = 0; p < P; ++p) {
          const size_t xi = (size_t)(((b * L + t) * H + h) * P + p);
          const double x = in.x[xi];
          double out = 0.0;
          for (int64_t n = 0; n < N; ++n) {
            double& sn = st[p * N + n];
            sn = decay * sn + dt * x * Bt[n];
            out += sn * Ct[n];
          }
          if (!in.D.empty()) out += in.D[h] * x;
          if (!in.z.empty()) {
            const double z = in.z[xi];
            out *= z / (1.0 + std::exp(-z));
          }
          y[xi] = out;
        }
      }
    }
  }
}

// Worst relative error seen per section, for the summary line.
double& worst_seen() {
  static double w = 0;
  return w;
}

// Relative error of got against want, each element judged against |want| + kFloorOfRms·(the RMS of
// want over its own (batch, head) slice): `slice` consecutive elements belong to one head (P for y,
// where heads interleave token by token; P·N for the state), heads cycle, batches are contiguous.
struct SliceError {
  double max_rel = 0;
  int64_t worst = -1;
};
template <typename A, typename B>
SliceError slice_error(const A* got, const B* want, int64_t n, int64_t slice, int64_t heads, int64_t batch) {
  const int64_t per_batch = n / batch;
  auto group_of = [&](int64_t e) { return e / per_batch * heads + e / slice % heads; };
  std::vector<double> sum_sq((size_t)(batch * heads), 0.0), count(sum_sq.size(), 0.0);
  for (int64_t e = 0; e < n; ++e) {
    sum_sq[(size_t)group_of(e)] += (double)want[e] * (double)want[e];
    count[(size_t)group_of(e)] += 1;
  }
  SliceError r;
  for (int64_t e = 0; e < n; ++e) {
    const size_t g = (size_t)group_of(e);
    const double floor = kFloorOfRms * std::sqrt(sum_sq[g] / count[g]) + 1e-30;
    const double rel = std::fabs((double)got[e] - (double)want[e]) / (std::fabs((double)want[e]) + floor);
    if (!(rel <= r.max_rel)) {  // NaN counts as worst
      r.max_rel = std::isnan(rel) ? INFINITY : rel;
      r.worst = e;
    }
  }
  return r;
}

// The smallest error a deliberately wrong reference produced (it must stay far above kRelTol).
double& weakest_detection() {
  static double w = INFINITY;
  return w;
}

// got ≈ want under the tolerance stated at the top; records the worst error.
template <typename A, typename B>
void check_close(const std::string& what, const A* got, const B* want, int64_t n, int64_t slice, int64_t heads,
                 int64_t batch) {
  const SliceError e = slice_error(got, want, n, slice, heads, batch);
  worst_seen() = std::max(worst_seen(), e.max_rel);
  MSSM_CHECK(e.max_rel <= kRelTol, "%s: max rel err %.3g > %.3g at %lld (got %.9g want %.9g)", what.c_str(),
             e.max_rel, kRelTol, (long long)e.worst, e.worst >= 0 ? (double)got[e.worst] : 0.0,
             e.worst >= 0 ? (double)want[e.worst] : 0.0);
}
template <typename A, typename B>
void check_y(const std::string& what, const A* got, const B* want, const Shape& s) {
  check_close(what, got, want, s.batch * s.length * s.heads * s.head_dim, s.head_dim, s.heads, s.batch);
}
template <typename A, typename B>
void check_state(const std::string& what, const A* got, const B* want, const Shape& s) {
  check_close(what, got, want, s.batch * s.heads * s.head_dim * s.state, s.head_dim * s.state, s.heads, s.batch);
}

std::string describe(const Inputs& in) {
  const Shape& s = in.s;
  char buf[256];
  std::snprintf(buf, sizeof buf, "b%lld L%lld H%lld P%lld N%lld G%lld Q%lld%s%s%s%s%s%s%s", (long long)s.batch,
                (long long)s.length, (long long)s.heads, (long long)s.head_dim, (long long)s.state,
                (long long)s.groups, (long long)s.chunk, in.o.D ? " D" : "", in.o.z ? " z" : "",
                in.o.bias ? " bias" : "", in.o.softplus ? " softplus" : "", in.o.clamp ? " clamp" : "",
                in.o.state_in ? " state_in" : "", in.o.alias ? " alias" : "");
  return buf;
}

// ssd_chunked against the double recurrence: y and the final state.
void test_chunked_matches_recurrence() {
  struct Case {
    Shape s;
    Options o;
  };
  Options plain;
  plain.D = plain.z = plain.bias = plain.state_in = false;
  Options all;  // D, z, bias, softplus, state_in
  Options clamp_alias = all;
  clamp_alias.clamp = clamp_alias.alias = true;
  Options raw_dt = all;
  raw_dt.softplus = false;
  raw_dt.bias = false;
  Options no_state = all;
  no_state.state_in = false;
  Options raw_clamp = raw_dt;
  raw_clamp.clamp = true;
  raw_clamp.state_in = false;

  const Case cases[] = {
      {{1, 1, 1, 1, 1, 1, 1}, plain},
      {{1, 1, 2, 5, 7, 1, 64}, all},
      {{1, 2, 2, 5, 7, 1, 1}, all},
      {{3, 7, 3, 5, 7, 3, 3}, all},
      {{1, 7, 1, 64, 128, 1, 64}, no_state},
      {{1, 16, 4, 16, 16, 2, 8}, plain},
      {{1, 16, 4, 16, 16, 2, 16}, clamp_alias},
      {{2, 33, 6, 16, 33, 3, 8}, clamp_alias},
      {{1, 33, 2, 64, 128, 1, 16}, all},
      {{1, 33, 5, 16, 16, 1, 1}, raw_dt},
      {{1, 100, 4, 5, 33, 2, 16}, raw_dt},
      {{3, 100, 6, 5, 128, 2, 64}, no_state},
      {{1, 100, 3, 1, 16, 3, 3}, raw_clamp},
      {{1, 257, 3, 16, 16, 1, 64}, clamp_alias},
      {{1, 257, 2, 64, 7, 2, 3}, all},
      {{1, 257, 1, 1, 1, 1, 8}, all},
      {{3, 257, 6, 16, 128, 3, 64}, no_state},
      {{1, 257, 4, 64, 33, 1, 64}, raw_dt},
      // batch·heads·P·N large enough that the kernel works through the chunks in several windows
      {{1, 257, 8, 64, 128, 2, 8}, clamp_alias},
      {{2, 100, 8, 64, 128, 4, 8}, no_state},
      // Lengths on either side of the chunks, chunk sizes that do not divide them, head_dim that is not
      // a multiple of 16 or spans several column blocks of the products (64 + 16, 64 + 36), states
      // whose rows end in partial row blocks.
      {{2, 63, 3, 20, 7, 1, 32}, all},
      {{1, 65, 4, 80, 33, 2, 64}, clamp_alias},
      {{2, 65, 2, 100, 130, 1, 16}, no_state},
      {{1, 257, 4, 16, 64, 4, 64}, raw_dt},
      {{2, 257, 2, 33, 16, 1, 100}, all},
      {{1, 513, 2, 64, 128, 1, 64}, all},
      {{1, 513, 2, 64, 128, 2, 256}, no_state},
      {{2, 513, 3, 24, 16, 3, 37}, clamp_alias},
      // C·Bᵀ blocks of 2·2·256² floats: the window holds 4 chunks, so 1100 tokens take two windows
      // (the second starting from the carried state), the last chunk partial.
      {{2, 1100, 2, 8, 16, 2, 256}, all},
  };
  uint64_t seed = 1000;
  for (const Case& c : cases) {
    const Inputs in = make_inputs(c.s, c.o, ++seed);
    std::vector<double> want_y, want_state;
    reference(in, want_y, want_state);
    const std::string name = describe(in);
    bool sensitivity_checked = false;
    for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
      std::vector<float> y(want_y.size(), NAN), state(want_state.size(), NAN);
      if (c.o.alias) {
        state = in.state;  // state_out == state_in: updated in place
        k.ssd_chunked(args_for(in, y.data(), state.data(), state.data()));
      } else {
        k.ssd_chunked(args_for(in, y.data(), or_null(in.state), state.data()));
      }
      check_y("chunked y " + name + " " + label, y.data(), want_y.data(), in.s);
      check_state("chunked state " + name + " " + label, state.data(), want_state.data(), in.s);
      if (!c.o.alias) {  // no state_out: the same y, bit for bit
        std::vector<float> y_only(y.size(), NAN);
        k.ssd_chunked(args_for(in, y_only.data(), or_null(in.state), nullptr));
        MSSM_CHECK(std::memcmp(y_only.data(), y.data(), y.size() * sizeof(float)) == 0,
                   "%s %s: y changes when state_out is null", name.c_str(), label.c_str());
      }
      if (!sensitivity_checked && c.s.length > 8) {
        // The comparison must reject a reference whose head-0 decay is off by 0.1%.
        sensitivity_checked = true;
        std::vector<double> wrong_y, wrong_state;
        reference(in, wrong_y, wrong_state, 1.001);
        const SliceError e = slice_error(y.data(), wrong_y.data(), (int64_t)y.size(), in.s.head_dim, in.s.heads,
                                         in.s.batch);
        weakest_detection() = std::min(weakest_detection(), e.max_rel);
        MSSM_CHECK(e.max_rel > 10 * kRelTol, "%s: a 0.1%% error in A went unnoticed (max rel %.3g)", name.c_str(),
                   e.max_rel);
      }
    });
  }
}

// Copies tokens [t0, t1) of every batch row into a shorter input (state left as in `in`).
Inputs slice(const Inputs& in, int64_t t0, int64_t t1) {
  Inputs out = in;
  const Shape& s = in.s;
  out.s.length = t1 - t0;
  auto cut = [&](const std::vector<float>& v, int64_t per_token) {
    std::vector<float> r;
    if (v.empty()) return r;
    for (int64_t b = 0; b < s.batch; ++b)
      r.insert(r.end(), v.begin() + (b * s.length + t0) * per_token, v.begin() + (b * s.length + t1) * per_token);
    return r;
  };
  out.x = cut(in.x, s.heads * s.head_dim);
  out.z = cut(in.z, s.heads * s.head_dim);
  out.dt = cut(in.dt, s.heads);
  out.B = cut(in.B, s.groups * s.state);
  out.C = cut(in.C, s.groups * s.state);
  return out;
}

// Two calls with the state carried (the second in place) give the same y and state as one call.
void test_split_equals_whole() {
  const int64_t L = 37;
  uint64_t seed = 2000;
  for (int64_t Q : {3, 8, 16}) {
    for (int64_t split : {int64_t(1), Q - 1, Q, Q + 1, int64_t(20)}) {
      if (split <= 0) continue;
      Options o;
      o.state_in = (split % 2) == 0;
      const Inputs in = make_inputs({2, L, 4, 5, 16, 2, Q}, o, ++seed);
      const Inputs first = slice(in, 0, split), second = slice(in, split, L);
      std::vector<double> want_y, want_state;
      reference(in, want_y, want_state);
      const std::string name = describe(in) + " split " + std::to_string(split);
      for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
        std::vector<float> whole_y(want_y.size()), whole_state(want_state.size());
        k.ssd_chunked(args_for(in, whole_y.data(), or_null(in.state), whole_state.data()));
        std::vector<float> y1(first.x.size()), y2(second.x.size()), state(want_state.size());
        k.ssd_chunked(args_for(first, y1.data(), or_null(in.state), state.data()));
        k.ssd_chunked(args_for(second, y2.data(), state.data(), state.data()));
        // Reassemble y in [batch, length] order.
        std::vector<float> split_y;
        const int64_t row = in.s.heads * in.s.head_dim;
        for (int64_t b = 0; b < in.s.batch; ++b) {
          split_y.insert(split_y.end(), y1.begin() + b * split * row, y1.begin() + (b + 1) * split * row);
          split_y.insert(split_y.end(), y2.begin() + b * (L - split) * row, y2.begin() + (b + 1) * (L - split) * row);
        }
        check_y("split y vs whole " + name + " " + label, split_y.data(), whole_y.data(), in.s);
        check_state("split state vs whole " + name + " " + label, state.data(), whole_state.data(), in.s);
        check_y("split y vs reference " + name + " " + label, split_y.data(), want_y.data(), in.s);
      });
    }
  }
}

// ssd_step applied token by token, the state alternately updated in place and written to a separate
// buffer; the first step starts from a null state_in when the inputs have no state.
void run_steps(const cpu::KernelTable& k, const Inputs& in, std::vector<float>& y, std::vector<float>& state) {
  const Shape& s = in.s;
  const int64_t H = s.heads, P = s.head_dim, N = s.state, L = s.length;
  state = in.state.empty() ? std::vector<float>((size_t)(s.batch * H * P * N), NAN) : in.state;
  y.assign((size_t)(s.batch * L * H * P), NAN);
  for (int64_t t = 0; t < L; ++t) {
    Inputs tok = slice(in, t, t + 1);
    std::vector<float> yt(tok.x.size(), NAN);
    const float* state_in = (t == 0 && in.state.empty()) ? nullptr : state.data();
    if (t % 2 == 0) {  // in place
      k.ssd_step(args_for(tok, yt.data(), state_in, state.data()));
    } else {  // into a separate buffer
      std::vector<float> next(state.size(), NAN);
      k.ssd_step(args_for(tok, yt.data(), state_in, next.data()));
      state = next;
    }
    for (int64_t b = 0; b < s.batch; ++b)
      std::memcpy(&y[(size_t)((b * L + t) * H * P)], &yt[(size_t)(b * H * P)], (size_t)(H * P) * sizeof(float));
  }
}

// The Mamba-1 selective scan over channels = heads·head_dim with every parameter expanded per channel.
void run_selective_scan(const cpu::KernelTable& k, const Inputs& in, std::vector<float>& y,
                        std::vector<float>& state) {
  const Shape& s = in.s;
  const int64_t H = s.heads, P = s.head_dim, N = s.state, L = s.length, channels = H * P;
  std::vector<float> delta((size_t)(s.batch * L * channels)), A((size_t)(channels * N)), D, bias;
  for (int64_t bt = 0; bt < s.batch * L; ++bt)
    for (int64_t d = 0; d < channels; ++d) delta[(size_t)(bt * channels + d)] = in.dt[(size_t)(bt * H + d / P)];
  for (int64_t d = 0; d < channels; ++d)
    for (int64_t n = 0; n < N; ++n) A[(size_t)(d * N + n)] = in.A[(size_t)(d / P)];
  if (!in.D.empty())
    for (int64_t d = 0; d < channels; ++d) D.push_back(in.D[(size_t)(d / P)]);
  if (!in.bias.empty())
    for (int64_t d = 0; d < channels; ++d) bias.push_back(in.bias[(size_t)(d / P)]);
  y.assign((size_t)(s.batch * L * channels), NAN);
  state.assign((size_t)(s.batch * channels * N), NAN);
  cpu::SelectiveScanArgs a;
  a.batch = s.batch;
  a.length = L;
  a.channels = channels;
  a.state = N;
  a.groups = s.groups;
  a.u = in.x.data();
  a.delta = delta.data();
  a.A = A.data();
  a.B = in.B.data();
  a.C = in.C.data();
  a.D = or_null(D);
  a.z = or_null(in.z);
  a.delta_bias = or_null(bias);
  a.delta_softplus = in.o.softplus;
  a.state_in = or_null(in.state);
  a.state_out = state.data();
  a.y = y.data();
  k.selective_scan(a);
}

// The duality: chunked (several chunk sizes) == step by step == selective scan == the recurrence.
// softplus on and no clamp, the setting in which the selective scan computes the same recurrence.
void test_duality() {
  uint64_t seed = 3000;
  for (bool with_state : {false, true}) {
    Options o;
    o.state_in = with_state;
    const Inputs base = make_inputs({2, 50, 4, 8, 16, 2, 1}, o, ++seed);
    std::vector<double> want_y, want_state;
    reference(base, want_y, want_state);
    const std::string name = describe(base);
    for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
      std::vector<float> step_y, step_state;
      run_steps(k, base, step_y, step_state);
      check_y("step y " + name + " " + label, step_y.data(), want_y.data(), base.s);
      check_state("step state " + name + " " + label, step_state.data(), want_state.data(), base.s);
      for (int64_t Q : {1, 4, 7, 16, 64}) {
        Inputs in = base;
        in.s.chunk = Q;
        std::vector<float> y(want_y.size()), state(want_state.size());
        k.ssd_chunked(args_for(in, y.data(), or_null(in.state), state.data()));
        const std::string what = name + " Q" + std::to_string(Q) + " " + label;
        check_y("chunked y vs step " + what, y.data(), step_y.data(), in.s);
        check_state("chunked state vs step " + what, state.data(), step_state.data(), in.s);
      }
    });
  }
}

// Model-like inputs (mamba2-130m heads: P 64, N 128, G 1), where the recurrence remembers longest:
// dt' from 0.001 to 0.1 (log-uniform, through softplus⁻¹), A from -16 to -1, over 513 tokens, at the
// chunk sizes a caller would pick; each against the double recurrence.
void test_model_like() {
  Options o;  // D, z, bias, softplus, state_in
  Inputs in = make_inputs({1, 513, 4, 64, 128, 1, 64}, o, 4000);
  Rng rng(4001);
  for (auto& d : in.dt) {
    const double target = std::exp(std::log(0.001) + (std::log(0.1) - std::log(0.001)) * rng.uniform());
    d = (float)std::log(std::expm1(target));
  }
  for (auto& b : in.bias) b = 0.0f;
  for (auto& a : in.A) a = -rng.uniform(1.0f, 16.0f);
  std::vector<double> want_y, want_state;
  reference(in, want_y, want_state);
  for (int64_t Q : {32, 64, 128, 256}) {
    in.s.chunk = Q;
    const std::string name = describe(in);
    for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
      std::vector<float> y(want_y.size(), NAN), state(want_state.size(), NAN);
      k.ssd_chunked(args_for(in, y.data(), in.state.data(), state.data()));
      check_y("model-like y " + name + " " + label, y.data(), want_y.data(), in.s);
      check_state("model-like state " + name + " " + label, state.data(), want_state.data(), in.s);
    });
  }
}

// bf16 products (SsdArgs::bf16_products). At avx512bf16 the chunk products round their operands to
// bf16 (a relative error of at most 2⁻⁹ each, so ≤ 2⁻⁸ a product) and accumulate in f32; against the
// double recurrence, y and the final state are judged by the RMS of the error over the RMS of the
// values (≤ kBf16Rms; these cases measure 0.7e-3 to 2.5e-3, the bf16 prefill GEMM's is 1.7e-3) and by
// the largest error under the floor rule above (≤ kBf16Max; measured up to 3.9e-2, on one y element of
// 74k), and they must differ from the f32 products' results (the bf16 path ran). A wrong operand
// (a pair out of order, a stride off) gives errors of the order of the values. Other levels ignore
// the flag: bit for bit the f32 results.
constexpr double kBf16Rms = 4e-3, kBf16Max = 6e-2;
double& worst_bf16_rms() {
  static double w = 0;
  return w;
}

template <typename B>
double rms_ratio(const float* got, const B* want, int64_t n) {
  double err = 0, ref = 0;
  for (int64_t e = 0; e < n; ++e) {
    const double d = (double)got[e] - (double)want[e];
    err += d * d;
    ref += (double)want[e] * (double)want[e];
  }
  return std::sqrt(err / std::max(ref, 1e-300));
}

void test_bf16_products() {
  struct Case {
    Shape s;
    Options o;
  };
  Options all;
  Options no_state = all;
  no_state.state_in = false;
  Options clamp_alias = all;
  clamp_alias.clamp = clamp_alias.alias = true;
  const Case cases[] = {
      {{1, 1, 2, 5, 7, 1, 64}, all},                 // one token
      {{1, 257, 4, 64, 128, 1, 64}, all},            // mamba2-130m heads, a partial last chunk
      {{2, 65, 3, 20, 7, 1, 32}, no_state},          // odd state, head_dim off the vector width
      {{1, 100, 4, 5, 33, 2, 16}, clamp_alias},      // odd state, groups
      {{2, 513, 3, 24, 16, 3, 37}, all},             // odd chunk size: chunks of odd length
      {{1, 65, 4, 80, 33, 2, 63}, clamp_alias},      // odd chunk size, odd last chunk, P over 64
      {{2, 1100, 2, 8, 16, 2, 256}, all},            // several windows of chunks
  };
  uint64_t seed = 7000;
  for (const Case& c : cases) {
    const Inputs in = make_inputs(c.s, c.o, ++seed);
    std::vector<double> want_y, want_state;
    reference(in, want_y, want_state);
    const std::string name = describe(in);
    for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
      auto run = [&](bool bf16, std::vector<float>& y, std::vector<float>& state) {
        y.assign(want_y.size(), NAN);
        state.assign(want_state.size(), NAN);
        cpu::SsdArgs a;
        if (c.o.alias) {
          state = in.state;
          a = args_for(in, y.data(), state.data(), state.data());
        } else {
          a = args_for(in, y.data(), or_null(in.state), state.data());
        }
        a.bf16_products = bf16;
        k.ssd_chunked(a);
      };
      std::vector<float> y, state, y32, state32;
      run(true, y, state);
      run(false, y32, state32);
      const bool same = y == y32 && state == state32;
      if (std::string(k.level) != "avx512bf16") {
        MSSM_CHECK(same, "%s %s: bf16_products changed the result at a level without bf16", name.c_str(),
                   label.c_str());
        return;
      }
      MSSM_CHECK(!same, "%s %s: bf16_products gave the f32 result bit for bit (did it run?)",
                 name.c_str(), label.c_str());
      const int64_t ny = (int64_t)y.size(), ns = (int64_t)state.size();
      const double rms_y = rms_ratio(y.data(), want_y.data(), ny), rms_s = rms_ratio(state.data(), want_state.data(), ns);
      const SliceError ey = slice_error(y.data(), want_y.data(), ny, in.s.head_dim, in.s.heads, in.s.batch);
      const SliceError es = slice_error(state.data(), want_state.data(), ns, in.s.head_dim * in.s.state,
                                        in.s.heads, in.s.batch);
      worst_bf16_rms() = std::max({worst_bf16_rms(), rms_y, rms_s});
      worst_seen() = std::max({worst_seen(), ey.max_rel, es.max_rel});
      MSSM_CHECK(rms_y <= kBf16Rms && rms_s <= kBf16Rms, "%s %s: bf16 RMS error y %.3g state %.3g > %.0e",
                 name.c_str(), label.c_str(), rms_y, rms_s, kBf16Rms);
      MSSM_CHECK(ey.max_rel <= kBf16Max && es.max_rel <= kBf16Max, "%s %s: bf16 max rel error y %.3g state %.3g > %.0e",
                 name.c_str(), label.c_str(), ey.max_rel, es.max_rel, kBf16Max);
    });
  }
}

// x, B and C read in place from wider rows (x_stride, bc_stride), as the model runner passes them
// inside the conv output's rows [x | B | C | padding]: the same results, bit for bit, as the packed
// layout, for ssd_chunked (f32 and bf16 products) and for ssd_step (whose stride is between sequences).
void test_strided_inputs() {
  Options all;
  const Shape shapes[] = {{2, 65, 4, 20, 33, 2, 16}, {1, 130, 4, 64, 128, 1, 64}, {3, 1, 3, 5, 7, 3, 8}};
  uint64_t seed = 7500;
  for (const Shape& shape : shapes) {
    const Inputs in = make_inputs(shape, all, ++seed);
    const Shape& s = in.s;
    const int64_t tokens = s.batch * s.length, xw = s.heads * s.head_dim, bcw = s.groups * s.state;
    const int64_t row = xw + 2 * bcw + 3;  // 3 floats of padding, so no stride is a multiple of another
    std::vector<float> rows((size_t)(tokens * row), NAN);
    for (int64_t t = 0; t < tokens; ++t) {
      std::memcpy(&rows[(size_t)(t * row)], &in.x[(size_t)(t * xw)], (size_t)xw * sizeof(float));
      std::memcpy(&rows[(size_t)(t * row + xw)], &in.B[(size_t)(t * bcw)], (size_t)bcw * sizeof(float));
      std::memcpy(&rows[(size_t)(t * row + xw + bcw)], &in.C[(size_t)(t * bcw)], (size_t)bcw * sizeof(float));
    }
    auto strided = [&](cpu::SsdArgs a) {
      a.x = rows.data();
      a.B = rows.data() + xw;
      a.C = rows.data() + xw + bcw;
      a.x_stride = a.bc_stride = row;
      return a;
    };
    const std::string name = describe(in);
    for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
      for (bool bf16 : {false, true}) {
        std::vector<float> y(in.x.size(), NAN), state(in.state.size(), NAN), y2 = y, state2 = state;
        cpu::SsdArgs a = args_for(in, y.data(), in.state.data(), state.data());
        a.bf16_products = bf16;
        k.ssd_chunked(a);
        cpu::SsdArgs b = strided(args_for(in, y2.data(), in.state.data(), state2.data()));
        b.bf16_products = bf16;
        k.ssd_chunked(b);
        MSSM_CHECK(y == y2 && state == state2, "%s %s%s: strided x, B, C change ssd_chunked's result", name.c_str(),
                   label.c_str(), bf16 ? " bf16" : "");
      }
      if (s.length == 1) {  // ssd_step: the strides are between sequences
        std::vector<float> y(in.x.size(), NAN), state(in.state.size(), NAN), y2 = y, state2 = state;
        k.ssd_step(args_for(in, y.data(), in.state.data(), state.data()));
        k.ssd_step(strided(args_for(in, y2.data(), in.state.data(), state2.data())));
        MSSM_CHECK(y == y2 && state == state2, "%s %s: strided x, B, C change ssd_step's result", name.c_str(),
                   label.c_str());
      }
    });
  }
}

// The Mamba-1 side of the duality. Run last: selective_scan lives in another kernel file and aborts
// while it is still a stub.
void test_duality_with_selective_scan() {
  for (bool with_state : {false, true}) {
    Options o;
    o.state_in = with_state;
    const Inputs in = make_inputs({2, 50, 4, 8, 16, 2, 16}, o, 3100 + with_state);
    const std::string name = describe(in);
    for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
      std::vector<float> y(in.x.size()), state(in.s.batch * in.s.heads * in.s.head_dim * in.s.state);
      k.ssd_chunked(args_for(in, y.data(), or_null(in.state), state.data()));
      std::vector<float> scan_y, scan_state;
      run_selective_scan(k, in, scan_y, scan_state);
      check_y("chunked y vs selective scan " + name + " " + label, y.data(), scan_y.data(), in.s);
      check_state("chunked state vs selective scan " + name + " " + label, state.data(), scan_state.data(), in.s);
    });
  }
}

void section(const char* name, void (*fn)()) {
  worst_seen() = 0;
  const int before = failures();
  fn();
  std::printf("  %-32s worst rel err %.3g (tolerance %.0e)%s\n", name, worst_seen(), kRelTol,
              failures() > before ? "  FAILED" : "");
  std::fflush(stdout);
}

}  // namespace

int main() {
  section("chunked vs recurrence", test_chunked_matches_recurrence);
  std::printf("  (a 0.1%% error in one head's A shows as a rel err of at least %.3g)\n", weakest_detection());
  section("split equals whole", test_split_equals_whole);
  section("model-like, 513 tokens", test_model_like);
  section("duality: chunked == step", test_duality);
  worst_seen() = 0;
  const int before = failures();
  test_bf16_products();
  std::printf("  %-32s worst RMS err %.3g (tolerance %.0e), worst rel err %.3g (tolerance %.0e)%s\n",
              "bf16 products", worst_bf16_rms(), kBf16Rms, worst_seen(), kBf16Max, failures() > before ? "  FAILED" : "");
  section("strided x, B, C", test_strided_inputs);
  section("duality: == selective scan", test_duality_with_selective_scan);
  return finish("test_ssd");
}
