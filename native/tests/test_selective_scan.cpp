// selective_scan and selective_state_update against the recurrence of kernels.h evaluated in
// float64, on every CPU level at 1 and N threads, over lengths around the kernel's runs of 64 tokens
// (up to 513), channel counts that are not multiples of the vector width or that span several groups
// of staged blocks, and model-like inputs (realistic Δ' and A over 513 tokens, where an error in the
// decay would accumulate most); token-by-token updates and a split sequence must agree with one call;
// and the kernels' exp and softplus are checked directly over their range.
//
// Tolerance: fp32 y and final states within 1e-5 relative of the reference, measured against
// |want| + floor with floor = RMS(output), so elements that cancel to near zero may be off by
// 1e-5·RMS absolute. Why that floor: with slow decay a state sums ~1/(1 - exp(Δ·A)) rounded terms,
// and y sums N of them; a plain fp32 loop of the recurrence itself reaches 3e-6·RMS absolute on
// the 100-token cases here, so a floor of 0.1·RMS would fail exact fp32 arithmetic.
#include <algorithm>
#include <cstring>

#include "test_util.h"

using namespace mssm;
using namespace mssm::test;

namespace {

constexpr double kRel = 1e-5;
constexpr double kFloor = 1.0;  // × RMS of the compared output

enum class StateOut { none, separate, aliased };

struct Case {
  int64_t batch, length, channels, state, groups;
  bool has_D, has_z, has_bias, softplus, has_state_in;
  StateOut state_out;
  std::vector<float> u, delta, A, B, C, D, z, bias, s_in;
  std::vector<double> y_ref, s_ref;

  // The kernel arguments, with state buffers supplied by the caller.
  cpu::SelectiveScanArgs args(const float* state_in, float* state_out, float* y) const {
    cpu::SelectiveScanArgs a;
    a.batch = batch, a.length = length, a.channels = channels, a.state = state, a.groups = groups;
    a.u = u.data(), a.delta = delta.data(), a.A = A.data(), a.B = B.data(), a.C = C.data();
    a.D = has_D ? D.data() : nullptr;
    a.z = has_z ? z.data() : nullptr;
    a.delta_bias = has_bias ? bias.data() : nullptr;
    a.delta_softplus = softplus;
    a.state_in = state_in, a.state_out = state_out, a.y = y;
    return a;
  }
};

double softplus(double v) { return v > 20 ? v : std::log1p(std::exp(v)); }

// The recurrence exactly as kernels.h writes it, one channel at a time.
void reference(Case& c) {
  const int64_t L = c.length, Dn = c.channels, N = c.state, G = c.groups;
  c.y_ref.assign(c.batch * L * Dn, 0.0);
  c.s_ref.assign(c.batch * Dn * N, 0.0);
  std::vector<double> s(N);
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t d = 0; d < Dn; ++d) {
      const int64_t g = d / (Dn / G);
      for (int64_t n = 0; n < N; ++n) s[n] = c.has_state_in ? c.s_in[(b * Dn + d) * N + n] : 0.0;
      for (int64_t t = 0; t < L; ++t) {
        const int64_t i = (b * L + t) * Dn + d;
        double dt = (double)c.delta[i] + (c.has_bias ? c.bias[d] : 0.0);
        if (c.softplus) dt = softplus(dt);
        const double u = c.u[i];
        const float* Bt = &c.B[((b * L + t) * G + g) * N];
        const float* Ct = &c.C[((b * L + t) * G + g) * N];
        double y = 0;
        for (int64_t n = 0; n < N; ++n) {
          s[n] = std::exp(dt * c.A[d * N + n]) * s[n] + dt * u * Bt[n];
          y += s[n] * Ct[n];
        }
        if (c.has_D) y += c.D[d] * u;
        if (c.has_z) y *= c.z[i] / (1.0 + std::exp(-(double)c.z[i]));
        c.y_ref[i] = y;
      }
      for (int64_t n = 0; n < N; ++n) c.s_ref[(b * Dn + d) * N + n] = s[n];
    }
}

Case make_case(Rng& rng, int64_t batch, int64_t length, int64_t channels, int64_t state, int64_t groups,
               unsigned options) {
  Case c{batch, length, channels, state, groups, (options & 1) != 0, (options & 2) != 0, (options & 4) != 0,
         (options & 8) != 0, (options & 16) != 0, (StateOut)(options / 32 % 3)};
  const size_t tokens = batch * length;
  c.u = rng.normals(tokens * channels);
  // Realistic Δ: before softplus uniform(-4, 1) gives Δ' from 0.02 to 1.3; without softplus Δ is
  // used as is, so it is drawn positive over the same span (and the bias kept small and positive).
  c.delta = c.softplus ? rng.uniforms(tokens * channels, -4, 1) : rng.uniforms(tokens * channels, 0.02f, 1.3f);
  c.bias = c.softplus ? rng.uniforms(channels, -1, 1) : rng.uniforms(channels, 0, 0.1f);
  c.A.resize(channels * state);
  for (auto& a : c.A) a = -std::exp(rng.uniform(-2, 2));
  c.B = rng.normals(tokens * groups * state);
  c.C = rng.normals(tokens * groups * state);
  c.D = rng.normals(channels);
  c.z = rng.normals(tokens * channels, 2);
  c.s_in = rng.normals(batch * channels * state);
  reference(c);
  return c;
}

std::vector<Case> make_cases() {
  std::vector<Case> cases;
  Rng rng(7);
  unsigned options = 0;
  // (channels, groups): channels not multiples of 8 or 16, and groups whose size is not either.
  const int64_t shapes[][2] = {{5, 1}, {24, 1}, {24, 2}, {24, 3}, {37, 1}, {42, 3}, {48, 3}};
  for (int64_t batch : {1, 3})
    for (int64_t length : {1, 2, 7, 33, 100})
      for (auto& shape : shapes)
        for (int64_t state : {1, 7, 16, 33}) {
          if (batch == 3 && length == 100 && state == 33) continue;  // keep the run short
          options = (options + 37) % 96;  // walks through every combination of the options
          cases.push_back(make_case(rng, batch, length, shape[0], state, shape[1], options));
        }
  // Every remainder of N modulo the kernels' tiles, and a wide state.
  for (int64_t state : {2, 3, 4, 5, 6, 128}) cases.push_back(make_case(rng, 1, 7, 37, state, 1, 31 + 32));
  // Longer than several staged runs of tokens (64), with every option on.
  cases.push_back(make_case(rng, 2, 300, 40, 16, 2, 31 + 64));
  // Lengths on either side of the runs and of the vector width, with channel counts that are not
  // multiples of 16 and that span several groups of blocks staged together (at N = 16 the kernel
  // stages up to 27 blocks of 16 channels): 500 channels are 31 blocks and a partial one, groups of
  // 250 and 100 channels end in a partial block each.
  const int64_t long_shapes[][3] = {{500, 1, 16}, {500, 2, 16}, {200, 2, 16}, {45, 3, 13}, {24, 1, 24}, {37, 1, 17}};
  for (int64_t length : {63, 65, 257, 513})
    for (auto& shape : long_shapes) {
      if (length >= 257 && shape[0] == 500 && shape[1] == 2) continue;  // keep the run short
      options = (options + 37) % 96;
      cases.push_back(make_case(rng, length == 65 ? 3 : 2, length, shape[0], shape[2], shape[1], options | 8));
    }
  return cases;
}

// Model-like inputs, where the recurrence remembers longest: Δ' from 0.001 to 0.1 (log-uniform, set
// through softplus⁻¹ and the bias), A from -16 to -1, u, B, C ~ N(0, 1), over 513 tokens. With Δ'·|A|
// down to 0.001 a state sums hundreds of decayed terms, so an exp whose error were biased would show
// here first (its relative error would grow with the number of tokens remembered).
std::vector<Case> make_model_like_cases() {
  std::vector<Case> cases;
  Rng rng(11);
  for (unsigned options : {31u, 31u + 32u, 15u + 64u}) {
    Case c = make_case(rng, 2, 513, 48, 16, 1, options | 8);
    for (auto& d : c.delta) {
      const double target = std::exp(std::log(0.001) + (std::log(0.1) - std::log(0.001)) * rng.uniform());
      d = (float)std::log(std::expm1(target));  // softplus⁻¹
    }
    for (auto& b : c.bias) b = 0.0f;
    for (auto& a : c.A) a = -rng.uniform(1.0f, 16.0f);
    if (options == 15u + 64u) {  // the slowest decay of the range everywhere: Δ' = 0.001, A = -1
      for (auto& d : c.delta) d = (float)std::log(std::expm1(0.001));
      for (auto& a : c.A) a = -1.0f;
    }
    reference(c);
    cases.push_back(c);
  }
  return cases;
}

std::string describe(const std::string& label, const Case& c) {
  char text[200];
  std::snprintf(text, sizeof text, "%s b%lld L%lld D%lld N%lld G%lld D%d z%d bias%d sp%d in%d out%d", label.c_str(),
                (long long)c.batch, (long long)c.length, (long long)c.channels, (long long)c.state,
                (long long)c.groups, c.has_D, c.has_z, c.has_bias, c.softplus, c.has_state_in, (int)c.state_out);
  return text;
}

// The largest relative error seen by test_sequence_form (printed: the margin to kRel).
double& worst_seen() {
  static double w = 0;
  return w;
}

void test_sequence_form(const std::vector<Case>& cases) {
  for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
    for (const Case& c : cases) {
      std::vector<float> y(c.batch * c.length * c.channels, NAN);
      std::vector<float> state = c.s_in, out(c.s_in.size(), NAN);
      const float* s_in = c.has_state_in ? state.data() : nullptr;
      float* s_out = c.state_out == StateOut::none ? nullptr
                     : c.state_out == StateOut::separate ? out.data()
                                                         : state.data();
      k.selective_scan(c.args(s_in, s_out, y.data()));
      const std::string what = describe(label, c);
      const double y_floor = kFloor * rms(c.y_ref.data(), y.size());
      expect_close((what + " y").c_str(), y.data(), c.y_ref.data(), (int64_t)y.size(), kRel, y_floor);
      worst_seen() = std::max(worst_seen(), compare(y.data(), c.y_ref.data(), (int64_t)y.size(), y_floor).max_rel);
      if (s_out) {
        const double s_floor = kFloor * rms(c.s_ref.data(), c.s_ref.size());
        expect_close((what + " state").c_str(), s_out, c.s_ref.data(), (int64_t)c.s_ref.size(), kRel, s_floor);
        worst_seen() =
            std::max(worst_seen(), compare(s_out, c.s_ref.data(), (int64_t)c.s_ref.size(), s_floor).max_rel);
      }
    }
  });
}

// Copies token range [t0, t0 + count) of a [batch, length, width] tensor.
std::vector<float> tokens(const std::vector<float>& v, int64_t batch, int64_t length, int64_t width, int64_t t0,
                          int64_t count) {
  std::vector<float> out(batch * count * width);
  for (int64_t b = 0; b < batch; ++b)
    std::memcpy(&out[b * count * width], &v[(b * length + t0) * width], count * width * sizeof(float));
  return out;
}

// c restricted to tokens [t0, t0 + count) (inputs only; no reference).
Case slice(const Case& c, int64_t t0, int64_t count) {
  Case s{c.batch, count, c.channels, c.state, c.groups, c.has_D, c.has_z, c.has_bias, c.softplus,
         c.has_state_in, c.state_out};
  s.A = c.A, s.D = c.D, s.bias = c.bias;
  const int64_t GN = c.groups * c.state;
  s.u = tokens(c.u, c.batch, c.length, c.channels, t0, count);
  s.delta = tokens(c.delta, c.batch, c.length, c.channels, t0, count);
  s.z = tokens(c.z, c.batch, c.length, c.channels, t0, count);
  s.B = tokens(c.B, c.batch, c.length, GN, t0, count);
  s.C = tokens(c.C, c.batch, c.length, GN, t0, count);
  return s;
}

// selective_state_update token by token, and the sequence cut in two calls with the state carried
// (in place), both equal one selective_scan call.
void test_step_and_split(const std::vector<Case>& cases) {
  for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
    for (const Case& c : cases) {
      if (c.length < 2 || c.batch != 3) continue;
      const int64_t L = c.length, Dn = c.channels;
      std::vector<float> y_seq(c.batch * L * Dn), s_seq(c.s_in.size());
      k.selective_scan(c.args(c.s_in.data(), s_seq.data(), y_seq.data()));
      const double y_floor = kFloor * rms(y_seq.data(), y_seq.size());
      const double s_floor = kFloor * rms(s_seq.data(), s_seq.size());
      const std::string what = describe(label, c);

      std::vector<float> state = c.s_in, y_step(y_seq.size()), y_t(c.batch * Dn);
      for (int64_t t = 0; t < L; ++t) {
        Case one = slice(c, t, 1);
        k.selective_state_update(one.args(state.data(), state.data(), y_t.data()));
        for (int64_t b = 0; b < c.batch; ++b)
          std::memcpy(&y_step[(b * L + t) * Dn], &y_t[b * Dn], Dn * sizeof(float));
      }
      expect_close((what + " step y").c_str(), y_step.data(), y_seq.data(), (int64_t)y_seq.size(), kRel, y_floor);
      expect_close((what + " step state").c_str(), state.data(), s_seq.data(), (int64_t)state.size(), kRel, s_floor);

      const int64_t first = L / 3 + 1;
      Case head = slice(c, 0, first), tail = slice(c, first, L - first);
      std::vector<float> carried = c.s_in, y1(c.batch * first * Dn), y2(c.batch * (L - first) * Dn);
      k.selective_scan(head.args(carried.data(), carried.data(), y1.data()));
      k.selective_scan(tail.args(carried.data(), carried.data(), y2.data()));
      std::vector<float> y_split(y_seq.size());
      for (int64_t b = 0; b < c.batch; ++b) {
        std::memcpy(&y_split[b * L * Dn], &y1[b * first * Dn], first * Dn * sizeof(float));
        std::memcpy(&y_split[(b * L + first) * Dn], &y2[b * (L - first) * Dn], (L - first) * Dn * sizeof(float));
      }
      expect_close((what + " split y").c_str(), y_split.data(), y_seq.data(), (int64_t)y_seq.size(), kRel, y_floor);
      expect_close((what + " split state").c_str(), carried.data(), s_seq.data(), (int64_t)carried.size(), kRel,
                   s_floor);
    }
  });
}

// With one state index, a unit state_in, B = 0 and C = 1, y = exp(Δ·A): the kernel's decay alone.
// Δ = 1 and A sweeps [-88, 0] (results down into the subnormal range) and far below (→ 0).
// Tolerance: (3e-7 + 1.5e-7·|Δ·A|) relative, plus 2 subnormal ulps (2.8e-45) absolute. 3e-7 is
// ≈ 2.5 ulp; the term in |Δ·A| is the documented error of the AVX-512 decay, which keeps A as
// A·log2 e and rounds the product Δ·A·log2 e once (so its error grows only where the decay is
// small: in absolute terms it stays below 0.6e-7). The other levels meet 3e-7 alone. With B = 1,
// state_in = 0, u = 1 instead, y = Δ' = softplus(Δ): swept over [-30, 30] to 3e-7 relative.
void test_exp_and_softplus() {
  const int64_t count = 2000;
  std::vector<float> A(count), ones(count, 1.0f), zeros(count, 0.0f), y(count);
  for (int64_t i = 0; i < count - 8; ++i) A[i] = -88.0f * (float)i / (count - 9);
  const float far[] = {-87.5f, -88.5f, -95.0f, -103.5f, -110.0f, -1000.0f, -1e30f, -INFINITY};
  for (int i = 0; i < 8; ++i) A[count - 8 + i] = far[i];
  std::vector<float> softplus_in(count);
  for (int64_t i = 0; i < count; ++i) softplus_in[i] = -30.0f + 60.0f * (float)i / (count - 1);

  for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
    cpu::SelectiveScanArgs a;
    a.channels = count, a.state = 1;
    a.u = ones.data(), a.delta = ones.data(), a.A = A.data(), a.B = zeros.data(), a.C = ones.data();
    a.state_in = ones.data(), a.y = y.data();
    k.selective_scan(a);
    int bad = 0;
    for (int64_t i = 0; i < count; ++i) {
      const double want = std::exp((double)A[i]);
      const double err = std::fabs(y[i] - want);
      const double x = std::fmin(std::fabs((double)A[i]), 1e6);  // |Δ·A|, finite
      const bool ok = err <= (3e-7 + 1.5e-7 * x) * want + 2.8e-45;
      if (!ok && bad++ < 3) std::fprintf(stderr, "  %s exp(%.9g) = %.9g, want %.9g\n", label.c_str(), A[i], y[i], want);
    }
    MSSM_CHECK(bad == 0, "%s: exp off at %d arguments", label.c_str(), bad);

    a.delta = softplus_in.data(), a.delta_softplus = true, a.B = ones.data(), a.state_in = zeros.data();
    k.selective_scan(a);
    bad = 0;
    for (int64_t i = 0; i < count; ++i) {
      const double want = softplus(softplus_in[i]);
      if (!(std::fabs(y[i] - want) <= 3e-7 * want) && bad++ < 3)
        std::fprintf(stderr, "  %s softplus(%.9g) = %.9g, want %.9g\n", label.c_str(), softplus_in[i], y[i], want);
    }
    MSSM_CHECK(bad == 0, "%s: softplus off at %d arguments", label.c_str(), bad);
  });
}

// The gate y ·= silu(z) over z in [-30, 30] and far below (where exp(-z) overflows): with one state
// index, A = 0, B = 0, C = 1 and state_in = 1, y = silu(z). Every level, the sequence form and the
// step; within 1e-6 relative plus 1e-36 absolute (z ≤ -88 may gate to silu(-88) ≈ -5e-37), and never
// NaN.
void test_gate() {
  std::vector<float> z;
  for (int i = 0; i <= 600; ++i) z.push_back(-30.0f + 0.1f * (float)i);
  for (float f : {-87.0f, -88.0f, -88.5f, -88.8f, -89.5f, -95.0f, -100.0f, -150.0f, -1e4f, -3e38f}) z.push_back(f);
  const int64_t count = (int64_t)z.size();
  std::vector<float> ones(count, 1.0f), zeros(count, 0.0f), y(count);
  for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
    for (bool step : {false, true}) {
      cpu::SelectiveScanArgs a;
      a.channels = count, a.state = 1;
      a.u = ones.data(), a.delta = ones.data(), a.A = zeros.data(), a.B = zeros.data(), a.C = ones.data();
      std::vector<float> state(ones);
      a.state_in = state.data(), a.state_out = step ? state.data() : nullptr, a.z = z.data(), a.y = y.data();
      std::fill(y.begin(), y.end(), NAN);
      step ? k.selective_state_update(a) : k.selective_scan(a);
      int bad = 0;
      for (int64_t i = 0; i < count; ++i) {
        const double want = z[i] > -1e4f ? (double)z[i] / (1.0 + std::exp(-(double)z[i])) : 0.0;
        if (!(std::fabs(y[i] - want) <= 1e-6 * std::fabs(want) + 1e-36) && bad++ < 3)
          std::fprintf(stderr, "  %s %s: silu(%.9g) = %.9g, want %.9g\n", label.c_str(), step ? "step" : "scan",
                       z[i], y[i], want);
      }
      MSSM_CHECK(bad == 0, "%s %s: the gate is off at %d arguments", label.c_str(), step ? "step" : "scan", bad);
    }
  });
}

// The comparison can fail: a 1e-4 relative error in one element, or a scan that forgets the
// state between tokens (decay 0), must exceed the tolerance.
void test_comparison_catches_errors(const std::vector<Case>& cases) {
  for (const Case& c : cases) {
    if (c.length != 33 || c.channels != 24 || c.state != 16 || c.batch != 1) continue;
    std::vector<float> y(c.y_ref.begin(), c.y_ref.end());
    const double floor = kFloor * rms(c.y_ref.data(), y.size());
    const auto largest = std::max_element(y.begin(), y.end(), [](float a, float b) { return std::fabs(a) < std::fabs(b); });
    *largest *= 1.0f + 1e-4f;
    MSSM_CHECK(compare(y.data(), c.y_ref.data(), (int64_t)y.size(), floor).max_rel > kRel, "perturbation missed");
    Case forgetful = c;
    for (auto& a : forgetful.A) a = -1e30f;
    reference(forgetful);
    MSSM_CHECK(compare(forgetful.y_ref.data(), c.y_ref.data(), (int64_t)y.size(), floor).max_rel > kRel,
               "missing state missed");
  }
}

}  // namespace

int main() {
  std::vector<Case> cases = make_cases();
  test_comparison_catches_errors(cases);
  test_exp_and_softplus();
  test_gate();
  test_sequence_form(cases);
  std::printf("  sequence form: worst rel err %.3g (tolerance %.0e)\n", worst_seen(), kRel);
  worst_seen() = 0;
  test_sequence_form(make_model_like_cases());
  std::printf("  model-like, 513 tokens: worst rel err %.3g (tolerance %.0e)\n", worst_seen(), kRel);
  test_step_and_split(cases);
  return finish("test_selective_scan");
}
