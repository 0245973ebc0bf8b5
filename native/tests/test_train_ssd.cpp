// The chunked SSD training op of native/train/ssd_chunked.h, at every CPU level this machine runs:
//  - forward (float and double) and its chunk-start states against a naive per-token recurrence
//    written here;
//  - every gradient (T = double) against central finite differences of L = Σ y ⊙ R, on tiny shapes
//    chosen to hit the awkward paths: length 1, a last chunk shorter than the others, chunk 1, chunk ≥
//    length, G = 2, a group's heads split over several tasks, with and without D and dt_bias,
//    softplus on and off (and its v > 20 branch), a dt clamp that clamps values at both ends;
//  - the float backward against the double one on a medium shape;
//  - forward and backward against scan_forward / scan_backward on the inputs
//    expanded per channel (the scan's per-channel dA, dD, ddelta_bias and ddelta summed per head);
//  - bit-identical outputs (boundary included) at 1, 2 and 3 threads, also when the scratch the op
//    keeps between calls holds NaN from an earlier call; results that do not depend on the chunk;
//    scratch that does not grow with length;
//  - that the gradient checker catches one perturbed element, and that bad arguments throw
//    std::invalid_argument naming the field.
//
// Tolerances:
//  - Forward vs the naive recurrence: |got − want| ≤ tol · (|want| + RMS(want)) per element (the RMS
//    floor because y is a sum that can cancel to near zero); tol = 1e-12 (double), 1e-5 (float, the
//    naive reference in double on the same float inputs). Boundary states likewise.
//  - Gradients vs finite differences (step 1e-6): ‖analytic − fd‖₂ / max(‖analytic‖₂, ‖fd‖₂) ≤ 1e-6
//    per input (the difference quotient itself is good to ~1e-9 here; a wrong term shows at 1e-3).
//  - Float backward vs double backward: the same norm-wise error ≤ 3e-5 per gradient (seen: ≤ 7e-6, dA
//    the worst, a sum over every token).
//  - SSD vs scan: norm-wise ≤ 1e-12 in double (the same sums in another order; seen ≤ 2e-14), ≤ 1e-4
//    in float (two float implementations, each within ~1e-6 of double).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "../train/ops.h"
#include "../train/ssd_chunked.h"
#include "train_test_util.h"

using namespace mssm;
using namespace mssm::test;
using namespace mssm::train;

namespace {

constexpr double kForwardDouble = 1e-12;
constexpr double kForwardFloat = 1e-5;
constexpr double kFloatGradTolerance = 3e-5;
constexpr double kScanDouble = 1e-12;
constexpr double kScanFloat = 1e-4;

std::string level_name = "?";

// ---- A problem: shapes, inputs and flags ------------------------------------------------------------

SsdTrainArgs ssd_args(int64_t batch, int64_t length, int64_t heads, int64_t head_dim, int64_t state, int64_t groups,
                      int64_t chunk, bool softplus = true, double dt_min = 0.0, double dt_max = INFINITY) {
  SsdTrainArgs a;
  a.batch = batch, a.length = length, a.heads = heads, a.head_dim = head_dim, a.state = state, a.groups = groups;
  a.chunk = chunk, a.softplus = softplus, a.dt_min = dt_min, a.dt_max = dt_max;
  return a;
}

// A problem's inputs in T, and the op's view of them (without D or dt_bias where the problem has none).
template <typename T>
struct Inputs {
  std::vector<T> x, dt, A, B, C, D, bias;
  bool has_D = false, has_bias = false;
  SsdTrainTensors<T> tensors() const {
    SsdTrainTensors<T> t;
    t.x = x.data(), t.dt = dt.data(), t.A = A.data(), t.B = B.data(), t.C = C.data();
    t.D = has_D ? D.data() : nullptr;
    t.dt_bias = has_bias ? bias.data() : nullptr;
    return t;
  }
  // The same inputs rounded to U.
  template <typename U>
  Inputs<U> as() const {
    return {cast<U>(x), cast<U>(dt), cast<U>(A), cast<U>(B), cast<U>(C), cast<U>(D), cast<U>(bias), has_D, has_bias};
  }
};

struct Case : Inputs<double> {
  SsdTrainArgs args;
  bool big_dt;

  Case(Rng& rng, const SsdTrainArgs& a, bool D_, bool bias_, bool big = false) : args(a), big_dt(big) {
    has_D = D_, has_bias = bias_;
    const int64_t bl = a.batch * a.length;
    x = normals(rng, bl * a.heads * a.head_dim);
    dt = a.softplus ? uniforms(rng, bl * a.heads, -3.0, 1.0) : uniforms(rng, bl * a.heads, 0.02, 0.8);
    if (big && !dt.empty()) dt[dt.size() / 2] = 25.0;  // softplus's v > 20 branch
    A = uniforms(rng, a.heads, -2.0, -0.05);
    B = normals(rng, bl * a.groups * a.state);
    C = normals(rng, bl * a.groups * a.state);
    D = normals(rng, a.heads);
    bias = a.softplus ? uniforms(rng, a.heads, -0.5, 0.5) : uniforms(rng, a.heads, 0.0, 0.2);
  }
  int64_t y_size() const { return args.batch * args.length * args.heads * args.head_dim; }
  int64_t chunks() const { return (args.length + args.chunk - 1) / args.chunk; }
  int64_t boundary_size() const { return args.batch * chunks() * args.heads * args.head_dim * args.state; }
  std::string name() const {
    const SsdTrainArgs& a = args;
    char s[256];
    std::snprintf(s, sizeof s, "batch %lld length %lld H %lld P %lld N %lld G %lld chunk %lld%s%s%s%s%s",
                  (long long)a.batch, (long long)a.length, (long long)a.heads, (long long)a.head_dim,
                  (long long)a.state, (long long)a.groups, (long long)a.chunk, a.softplus ? " softplus" : "",
                  has_D ? " D" : "", has_bias ? " bias" : "", a.dt_min > 0 || std::isfinite(a.dt_max) ? " clamp" : "",
                  big_dt ? " v>20" : "");
    return s;
  }
  // The processed dt as the test computes it (double), and how many values the clamp changed below and above.
  double step(int64_t i) const {
    double v = dt[i] + (has_bias ? bias[i % args.heads] : 0.0);
    if (args.softplus && v <= 20) v = std::log1p(std::exp(v));
    return v;
  }
  void clamped(int64_t* below, int64_t* above) const {
    *below = *above = 0;
    for (size_t i = 0; i < dt.size(); ++i) {
      const double v = step((int64_t)i);
      *below += v < args.dt_min;
      *above += v > args.dt_max;
    }
  }
};

// The recurrence, token by token, in double: y and the state at the start of every chunk.
void naive_forward(const SsdTrainArgs& a, const SsdTrainTensors<double>& t, Vec& y, Vec& boundary) {
  const int64_t L = a.length, H = a.heads, P = a.head_dim, N = a.state, G = a.groups, Q = a.chunk;
  const int64_t chunks = (L + Q - 1) / Q;
  y.assign(a.batch * L * H * P, 0.0);
  boundary.assign(a.batch * chunks * H * P * N, 0.0);
  for (int64_t b = 0; b < a.batch; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / G);
      Vec s(P * N, 0.0);
      for (int64_t tok = 0; tok < L; ++tok) {
        if (tok % Q == 0)
          std::copy(s.begin(), s.end(), boundary.begin() + ((b * chunks + tok / Q) * H + h) * P * N);
        const int64_t row = b * L + tok;
        double v = t.dt[row * H + h] + (t.dt_bias ? t.dt_bias[h] : 0.0);
        if (a.softplus && v <= 20) v = std::log1p(std::exp(v));
        const double dt = std::min(std::max(v, a.dt_min), a.dt_max);
        const double decay = std::exp(dt * t.A[h]);
        const double* Bt = t.B + (row * G + g) * N;
        const double* Ct = t.C + (row * G + g) * N;
        const double* x = t.x + (row * H + h) * P;
        for (int64_t p = 0; p < P; ++p) {
          double out = t.D ? t.D[h] * x[p] : 0.0;
          for (int64_t n = 0; n < N; ++n) {
            double& state = s[p * N + n];
            state = decay * state + dt * x[p] * Bt[n];
            out += state * Ct[n];
          }
          y[(row * H + h) * P + p] = out;
        }
      }
    }
}

// The analytic gradients of the double SSD with dy = R; (+=) outputs with their prefill removed.
struct Grads {
  Vec dx, ddt, dA, dB, dC, dD, dbias;
  SsdTrainGrads<double> view() {
    SsdTrainGrads<double> g;
    g.dx = dx.data(), g.ddt = ddt.data(), g.dA = dA.data(), g.dB = dB.data(), g.dC = dC.data();
    g.dD = dD.empty() ? nullptr : dD.data();
    g.ddt_bias = dbias.empty() ? nullptr : dbias.data();
    return g;
  }
};

// The loss the gradients are of: L = Σ y ⊙ R, y from the double SSD.
double ssd_loss(const Case& c, const Vec& R) {
  Vec y(c.y_size()), boundary(c.boundary_size());
  ssd_forward<double>(c.args, c.tensors(), y.data(), boundary.data());
  return dot(y, R);
}

Grads ssd_gradients(Rng& rng, const Case& c, const Vec& R) {
  const SsdTrainArgs& a = c.args;
  Vec y(c.y_size()), boundary(c.boundary_size());
  ssd_forward<double>(a, c.tensors(), y.data(), boundary.data());
  Grads o;
  o.dx = poisoned<double>(c.x.size()), o.ddt = poisoned<double>(c.dt.size());
  o.dB = poisoned<double>(c.B.size()), o.dC = poisoned<double>(c.C.size());
  const Vec dA0 = normals(rng, c.A.size()), dD0 = normals(rng, c.D.size()), db0 = normals(rng, c.bias.size());
  o.dA = dA0;
  if (c.has_D) o.dD = dD0;
  if (c.has_bias) o.dbias = db0;
  ssd_backward<double>(a, c.tensors(), boundary.data(), R.data(), o.view());
  o.dA = minus(o.dA, dA0);
  if (c.has_D) o.dD = minus(o.dD, dD0);
  if (c.has_bias) o.dbias = minus(o.dbias, db0);
  return o;
}

// ---- Forward against the recurrence ----------------------------------------------------------------------

// y and the chunk-start states of the op in T against the recurrence's, want_y and want_boundary.
template <typename T>
void expect_forward(const Case& c, const Inputs<T>& in, const Vec& want_y, const Vec& want_boundary, double tol) {
  const std::string type = std::is_same_v<T, float> ? "float" : "double";
  std::vector<T> y = poisoned<T>(c.y_size()), boundary = poisoned<T>(c.boundary_size());
  ssd_forward<T>(c.args, in.tensors(), y.data(), boundary.data());
  // (+1e-300: a single chunk's boundary is all zeros, and 0 against 0 is then exact, not 0/0)
  const double fy = rms(want_y.data(), want_y.size()) + 1e-300,
               fb = rms(want_boundary.data(), want_boundary.size()) + 1e-300;
  record("forward y vs recurrence, " + type, compare(y.data(), want_y.data(), y.size(), fy).max_rel);
  record("forward boundary vs recurrence, " + type,
         compare(boundary.data(), want_boundary.data(), boundary.size(), fb).max_rel);
  expect_close((type + " y, " + c.name()).c_str(), y.data(), want_y.data(), y.size(), tol, fy);
  expect_close((type + " boundary, " + c.name()).c_str(), boundary.data(), want_boundary.data(), boundary.size(), tol,
               fb);
}

void check_forward(const Case& c) {
  Vec want_y, want_boundary;
  naive_forward(c.args, c.tensors(), want_y, want_boundary);
  expect_forward<double>(c, c, want_y, want_boundary, kForwardDouble);
  // The float op on float inputs, against the double recurrence on the same (rounded) inputs.
  const Inputs<float> rounded = c.as<float>();
  naive_forward(c.args, rounded.as<double>().tensors(), want_y, want_boundary);
  expect_forward<float>(c, rounded, want_y, want_boundary, kForwardFloat);
}

void test_forward_matches_recurrence() {
  Rng rng(1);
  check_forward(Case(rng, ssd_args(1, 1, 2, 3, 2, 1, 64), true, true));
  check_forward(Case(rng, ssd_args(2, 13, 4, 3, 5, 2, 4), true, false));
  check_forward(Case(rng, ssd_args(1, 9, 2, 2, 3, 1, 1, false), false, true));
  check_forward(Case(rng, ssd_args(2, 7, 4, 5, 4, 2, 16, true, 0.1, 0.7), true, true));
  check_forward(Case(rng, ssd_args(1, 37, 3, 17, 18, 1, 5), true, true, true));
  check_forward(Case(rng, ssd_args(2, 100, 18, 33, 20, 2, 32), true, true));
  check_forward(Case(rng, ssd_args(1, 130, 4, 32, 64, 1, 64, true, 0.001, 0.1), true, true));
}

// ---- Gradients against finite differences -----------------------------------------------------------------

void check_gradients(Rng& rng, Case c) {
  const std::string what = c.name();
  const Vec R = normals(rng, c.y_size());
  auto loss = [&] { return ssd_loss(c, R); };
  const Grads g = ssd_gradients(rng, c, R);
  auto expect = [&](const char* name, const Vec& analytic, Vec& input) {
    const Vec fd = finite_differences(input, loss);
    const double err = norm_error(analytic.data(), fd.data(), fd.size());
    record(std::string("grad vs finite differences ") + name, err);
    MSSM_CHECK(err <= kGradTolerance, "[%s] %s %s: gradient error %.3g vs finite differences (limit %.1g)",
               level_name.c_str(), what.c_str(), name, err, kGradTolerance);
  };
  expect("dx", g.dx, c.x);
  expect("ddt", g.ddt, c.dt);
  expect("dA", g.dA, c.A);
  expect("dB", g.dB, c.B);
  expect("dC", g.dC, c.C);
  if (c.has_D) expect("dD", g.dD, c.D);
  if (c.has_bias) expect("ddt_bias", g.dbias, c.bias);
}

void test_gradients_against_finite_differences() {
  Rng rng(2);
  // length 1
  check_gradients(rng, Case(rng, ssd_args(1, 1, 2, 3, 2, 1, 64), true, true));
  // a last chunk shorter than the others; G = 2 with H = 4
  check_gradients(rng, Case(rng, ssd_args(2, 13, 4, 3, 5, 2, 4), true, false));
  check_gradients(rng, Case(rng, ssd_args(1, 13, 4, 2, 3, 2, 4, false), false, true));
  // chunk 1; softplus off
  check_gradients(rng, Case(rng, ssd_args(1, 9, 2, 2, 3, 1, 1, false), false, true));
  // chunk ≥ length
  check_gradients(rng, Case(rng, ssd_args(2, 7, 4, 5, 4, 2, 16), true, true));
  check_gradients(rng, Case(rng, ssd_args(1, 6, 2, 3, 3, 1, 6), false, false));
  // softplus's v > 20 branch
  check_gradients(rng, Case(rng, ssd_args(1, 11, 2, 3, 4, 1, 3), true, true, true));
  // rows wider than one vector, not multiples of it
  check_gradients(rng, Case(rng, ssd_args(1, 10, 2, 17, 18, 1, 4), true, true));
  // a group's heads split over several tasks (4 blocks: 5, 5, 5 and 3 heads), their dB / dC summed per chunk
  check_gradients(rng, Case(rng, ssd_args(1, 6, 18, 2, 3, 1, 4), true, true));
  // an active clamp (checked below to clamp at both ends), softplus on and off
  {
    Case c(rng, ssd_args(2, 9, 4, 3, 4, 2, 4, true, 0.15, 0.8), true, true);
    int64_t below, above;
    c.clamped(&below, &above);
    MSSM_CHECK(below > 0 && above > 0, "clamp case clamps %lld values below dt_min and %lld above dt_max",
               (long long)below, (long long)above);
    check_gradients(rng, c);
  }
  {
    Case c(rng, ssd_args(1, 10, 2, 3, 3, 1, 3, false, 0.25, 0.6), false, true);
    int64_t below, above;
    c.clamped(&below, &above);
    MSSM_CHECK(below > 0 && above > 0, "clamp case (no softplus) clamps %lld below and %lld above", (long long)below,
               (long long)above);
    check_gradients(rng, c);
  }
}

// ---- The checker can fail ------------------------------------------------------------------------------------

void test_checker_detects_a_wrong_gradient() {
  Rng rng(3);
  Case c(rng, ssd_args(1, 9, 2, 3, 4, 1, 4), true, true);
  const Vec R = normals(rng, c.y_size());
  auto loss = [&] { return ssd_loss(c, R); };
  const Grads g = ssd_gradients(rng, c, R);
  for (int which = 0; which < 2; ++which) {
    Vec& input = which ? c.dt : c.x;
    const Vec& analytic = which ? g.ddt : g.dx;
    const Vec fd = finite_differences(input, loss);
    const double right = norm_error(analytic.data(), fd.data(), fd.size());
    // One element off by 1e-4 of the gradient's norm: far smaller than a wrong term makes.
    Vec wrong = analytic;
    wrong[wrong.size() / 2] += 1e-4 * std::sqrt(dot(analytic, analytic));
    const double caught = norm_error(wrong.data(), fd.data(), fd.size());
    MSSM_CHECK(right <= kGradTolerance && caught > kGradTolerance,
               "checker (%s): correct error %.3g, perturbed %.3g (limit %.1g): the perturbation was not caught",
               which ? "ddt" : "dx", right, caught, kGradTolerance);
    std::printf("  checker: correct %s error %.2g, one element off by 1e-4 of the norm: %.2g (limit %.0e)\n",
                which ? "ddt" : "dx", right, caught, kGradTolerance);
  }
}

// ---- Float backward against double ----------------------------------------------------------------------------

struct FloatGrads {
  FVec dx, ddt, dA, dB, dC, dD, dbias;
};
FloatGrads float_gradients(const Case& c, const FVec& R) {
  const Inputs<float> in = c.as<float>();
  const SsdTrainTensors<float> t = in.tensors();
  FVec y(c.y_size()), boundary(c.boundary_size());
  ssd_forward<float>(c.args, t, y.data(), boundary.data());
  FloatGrads o;
  o.dx = poisoned<float>(c.x.size()), o.ddt = poisoned<float>(c.dt.size()), o.dB = poisoned<float>(c.B.size()),
  o.dC = poisoned<float>(c.C.size());
  o.dA.assign(c.A.size(), 0.0f), o.dD.assign(c.D.size(), 0.0f), o.dbias.assign(c.bias.size(), 0.0f);
  SsdTrainGrads<float> g;
  g.dx = o.dx.data(), g.ddt = o.ddt.data(), g.dA = o.dA.data(), g.dB = o.dB.data(), g.dC = o.dC.data();
  g.dD = c.has_D ? o.dD.data() : nullptr;
  g.ddt_bias = c.has_bias ? o.dbias.data() : nullptr;
  ssd_backward<float>(c.args, t, boundary.data(), R.data(), g);
  return o;
}

void test_float_backward_matches_double() {
  Rng rng(4);
  for (const SsdTrainArgs& a : {ssd_args(2, 100, 6, 20, 24, 2, 16, true, 0.0, 0.9), ssd_args(1, 200, 4, 32, 64, 1, 64),
                                ssd_args(2, 77, 18, 16, 16, 1, 32)}) {
    Case c(rng, a, true, true);
    // The inputs rounded to float, so that both see the same problem.
    for (Vec* v : {&c.x, &c.dt, &c.A, &c.B, &c.C, &c.D, &c.bias}) *v = cast<double>(cast<float>(*v));
    const FVec Rf = cast<float>(normals(rng, c.y_size()));
    const Grads want = ssd_gradients(rng, c, cast<double>(Rf));
    const FloatGrads got = float_gradients(c, Rf);
    auto expect = [&](const char* name, const FVec& g, const Vec& w) {
      const double err = norm_error(g.data(), w.data(), w.size());
      record(std::string("float backward vs double ") + name, err);
      MSSM_CHECK(err <= kFloatGradTolerance, "[%s] %s %s: float gradient error %.3g vs double (limit %.1g)",
                 level_name.c_str(), c.name().c_str(), name, err, kFloatGradTolerance);
    };
    expect("dx", got.dx, want.dx);
    expect("ddt", got.ddt, want.ddt);
    expect("dA", got.dA, want.dA);
    expect("dB", got.dB, want.dB);
    expect("dC", got.dC, want.dC);
    expect("dD", got.dD, want.dD);
    expect("ddt_bias", got.dbias, want.dbias);
  }
}

// ---- Against the selective scan on expanded inputs ------------------------------------------------------------

template <typename T>
void check_against_scan(Rng& rng, const SsdTrainArgs& a, bool has_D, bool has_bias, double tol) {
  const char* type = std::is_same_v<T, float> ? "float" : "double";
  Case c(rng, a, has_D, has_bias);
  const int64_t L = a.length, H = a.heads, P = a.head_dim, N = a.state, HP = H * P, bl = a.batch * L;
  const Inputs<T> in = c.as<T>();
  const auto dy = cast<T>(normals(rng, c.y_size()));
  // The scan's view: channel h·P + p; dt, A, D, dt_bias repeated over the head's channels (and A over n).
  std::vector<T> delta(bl * HP), As(HP * N), Ds(HP), biass(HP);
  for (int64_t r = 0; r < bl; ++r)
    for (int64_t d = 0; d < HP; ++d) delta[r * HP + d] = in.dt[r * H + d / P];
  for (int64_t d = 0; d < HP; ++d) {
    std::fill(As.begin() + d * N, As.begin() + (d + 1) * N, in.A[d / P]);
    Ds[d] = in.D[d / P];
    biass[d] = in.bias[d / P];
  }
  ScanArgs sa;
  sa.batch = a.batch, sa.length = L, sa.channels = HP, sa.state = N, sa.groups = a.groups, sa.chunk = a.chunk;
  sa.softplus = a.softplus, sa.dt_min = a.dt_min, sa.dt_max = a.dt_max;
  ScanTensors<T> st;
  st.u = in.x.data(), st.delta = delta.data(), st.A = As.data(), st.B = in.B.data(), st.C = in.C.data();
  st.D = has_D ? Ds.data() : nullptr;
  st.delta_bias = has_bias ? biass.data() : nullptr;
  const SsdTrainTensors<T> t = in.tensors();

  std::vector<T> y_scan(c.y_size()), b_scan(c.boundary_size()), y_ssd(c.y_size()), b_ssd(c.boundary_size());
  scan_forward<T>(sa, st, y_scan.data(), b_scan.data());
  ssd_forward<T>(a, t, y_ssd.data(), b_ssd.data());

  std::vector<T> du(bl * HP), ddelta(bl * HP), dAs(HP * N, T(0)), dBs(in.B.size()), dCs(in.C.size()), dDs(HP, T(0)),
      dbiass(HP, T(0));
  ScanGrads<T> sg;
  sg.du = du.data(), sg.ddelta = ddelta.data(), sg.dA = dAs.data(), sg.dB = dBs.data(), sg.dC = dCs.data();
  sg.dD = has_D ? dDs.data() : nullptr;
  sg.ddelta_bias = has_bias ? dbiass.data() : nullptr;
  scan_backward<T>(sa, st, b_scan.data(), dy.data(), sg);

  std::vector<T> dx(in.x.size()), ddt(in.dt.size()), dA(H, T(0)), dB(in.B.size()), dC(in.C.size()), dD(H, T(0)),
      dbias(H, T(0));
  SsdTrainGrads<T> g;
  g.dx = dx.data(), g.ddt = ddt.data(), g.dA = dA.data(), g.dB = dB.data(), g.dC = dC.data();
  g.dD = has_D ? dD.data() : nullptr;
  g.ddt_bias = has_bias ? dbias.data() : nullptr;
  ssd_backward<T>(a, t, b_ssd.data(), dy.data(), g);

  // The scan's per-channel gradients summed per head (in double).
  Vec ddt_want(bl * H, 0.0), dA_want(H, 0.0), dD_want(H, 0.0), dbias_want(H, 0.0);
  for (int64_t r = 0; r < bl; ++r)
    for (int64_t d = 0; d < HP; ++d) ddt_want[r * H + d / P] += (double)ddelta[r * HP + d];
  for (int64_t d = 0; d < HP; ++d) {
    for (int64_t n = 0; n < N; ++n) dA_want[d / P] += (double)dAs[d * N + n];
    dD_want[d / P] += (double)dDs[d];
    dbias_want[d / P] += (double)dbiass[d];
  }
  const std::string what = std::string("[") + level_name + "] ssd vs scan (" + type + ") " + c.name();
  auto expect = [&](const char* name, const auto& got, const auto& want) {
    const double err = norm_error(got.data(), want.data(), want.size());
    record(std::string("ssd vs scan, ") + type + " " + name, err);
    MSSM_CHECK(err <= tol, "%s %s: error %.3g (limit %.1g)", what.c_str(), name, err, tol);
  };
  expect("y", y_ssd, y_scan);
  expect("boundary", b_ssd, b_scan);
  expect("dx", dx, du);
  expect("ddt", ddt, ddt_want);
  expect("dA", dA, dA_want);
  expect("dB", dB, dBs);
  expect("dC", dC, dCs);
  if (has_D) expect("dD", dD, dD_want);
  if (has_bias) expect("ddt_bias", dbias, dbias_want);
}

void test_matches_scan() {
  Rng rng(5);
  for (const SsdTrainArgs& a : {ssd_args(2, 45, 4, 16, 8, 2, 8), ssd_args(1, 100, 18, 8, 16, 1, 32, true, 0.05, 0.9),
                                ssd_args(2, 64, 2, 32, 64, 1, 64, false, 0.0, 0.5)}) {
    check_against_scan<double>(rng, a, true, true, kScanDouble);
    check_against_scan<float>(rng, a, true, true, kScanFloat);
  }
  check_against_scan<double>(rng, ssd_args(1, 30, 4, 5, 7, 2, 7), false, false, kScanDouble);
  check_against_scan<float>(rng, ssd_args(1, 30, 4, 5, 7, 2, 7), false, false, kScanFloat);
}

// ---- Threads, chunk, memory -------------------------------------------------------------------------------------

// Runs the float op on a larger problem whose inputs are all NaN: the scratch each thread keeps from
// call to call then holds NaN wherever the next call could read stale values.
void poison_scratch(const SsdTrainArgs& like) {
  SsdTrainArgs a = like;
  a.batch += 1, a.length += 37, a.head_dim += 5, a.state += 3;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t bl = a.batch * a.length, chunks = (a.length + a.chunk - 1) / a.chunk;
  const int64_t x_size = bl * a.heads * a.head_dim, bc_size = bl * a.groups * a.state;
  const Inputs<float> in{FVec(x_size, nan), FVec(bl * a.heads, nan), FVec(a.heads, nan), FVec(bc_size, nan),
                         FVec(bc_size, nan), FVec(a.heads, nan), FVec(a.heads, nan), true, true};
  FVec y(x_size), boundary(a.batch * chunks * a.heads * a.head_dim * a.state), dx(x_size), ddt(in.dt.size()),
      dA(a.heads), dB(bc_size), dC(bc_size), dD(a.heads), db(a.heads);
  const SsdTrainTensors<float> t = in.tensors();
  ssd_forward<float>(a, t, y.data(), boundary.data());
  SsdTrainGrads<float> g;
  g.dx = dx.data(), g.ddt = ddt.data(), g.dA = dA.data(), g.dB = dB.data(), g.dC = dC.data(), g.dD = dD.data();
  g.ddt_bias = db.data();
  ssd_backward<float>(a, t, boundary.data(), in.x.data(), g);  // dy: NaN too
}

void test_results_do_not_depend_on_thread_count() {
  Rng rng(6);
  const int saved = num_threads();
  // A short last chunk and rows not whole vectors; 2 batches × 2 groups (4 tasks); 1 batch × 2 groups ×
  // 2 blocks of heads (4 tasks, dB / dC summed over blocks); 3 batches × 2 blocks of 4 heads.
  for (const SsdTrainArgs& a : {ssd_args(2, 45, 18, 20, 17, 2, 8), ssd_args(1, 45, 18, 20, 17, 2, 8),
                                ssd_args(3, 64, 4, 32, 64, 1, 16)}) {
    Case c(rng, a, true, true);
    const Inputs<float> in = c.as<float>();
    const SsdTrainTensors<float> t = in.tensors();
    const FVec dy = cast<float>(normals(rng, c.y_size()));
    std::vector<FVec> reference;
    // 1 thread first; then 2 and 3, and 1 again, each after the kept scratch was filled with NaN.
    bool first_run = true;
    for (int threads : {1, 2, 3, 1}) {
      set_num_threads(threads);
      if (!first_run) poison_scratch(a);
      FVec y(c.y_size()), boundary(c.boundary_size()), dx(in.x.size()), ddt(in.dt.size()), dA(in.A.size(), 0.5f),
          dB(in.B.size()), dC(in.C.size()), dD(in.D.size(), 0.25f), dbias(in.bias.size(), -0.5f);
      ssd_forward<float>(a, t, y.data(), boundary.data());
      SsdTrainGrads<float> g;
      g.dx = dx.data(), g.ddt = ddt.data(), g.dA = dA.data(), g.dB = dB.data(), g.dC = dC.data(), g.dD = dD.data();
      g.ddt_bias = dbias.data();
      ssd_backward<float>(a, t, boundary.data(), dy.data(), g);
      std::vector<FVec> got = {y, boundary, dx, ddt, dA, dB, dC, dD, dbias};
      const char* names[] = {"y", "boundary", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias"};
      for (size_t k = 0; k < got.size(); ++k)
        MSSM_CHECK(std::all_of(got[k].begin(), got[k].end(), [](float v) { return std::isfinite(v); }),
                   "[%s] %s: %s at %d threads is not finite", level_name.c_str(), c.name().c_str(), names[k], threads);
      if (first_run) {
        reference = got;
        first_run = false;
        continue;
      }
      for (size_t k = 0; k < got.size(); ++k)
        MSSM_CHECK(std::memcmp(got[k].data(), reference[k].data(), got[k].size() * sizeof(float)) == 0,
                   "[%s] %s: %s at %d threads (scratch poisoned before) is not bit-identical to the first run at 1 "
                   "thread",
                   level_name.c_str(), c.name().c_str(), names[k], threads);
    }
  }
  set_num_threads(saved);
}

void test_chunk_changes_memory_not_results() {
  Rng rng(7);
  Case base(rng, ssd_args(2, 23, 4, 6, 5, 2, 64), true, true);
  const Vec R = normals(rng, base.y_size());
  Rng r0(70);
  const Grads ref = ssd_gradients(r0, base, R);
  Vec y_ref(base.y_size()), b_ref(base.boundary_size());
  ssd_forward<double>(base.args, base.tensors(), y_ref.data(), b_ref.data());
  for (int64_t chunk : {1, 3, 5, 8, 22, 23}) {
    Case c = base;
    c.args.chunk = chunk;
    Vec y(c.y_size()), boundary(c.boundary_size());
    ssd_forward<double>(c.args, c.tensors(), y.data(), boundary.data());
    Rng r1(70);
    const Grads g = ssd_gradients(r1, c, R);
    double err = norm_error(y.data(), y_ref.data(), y.size());
    for (auto [got, want] : {std::pair{&g.dx, &ref.dx}, {&g.ddt, &ref.ddt}, {&g.dA, &ref.dA}, {&g.dB, &ref.dB},
                             {&g.dC, &ref.dC}, {&g.dD, &ref.dD}, {&g.dbias, &ref.dbias}})
      err = std::max(err, norm_error(got->data(), want->data(), want->size()));
    record("results, chunk vs chunk 64 (double)", err);
    MSSM_CHECK(err <= 1e-12, "[%s] chunk %lld: results differ from chunk 64 by %.3g", level_name.c_str(),
               (long long)chunk, err);
  }
}

void test_scratch_does_not_grow_with_length() {
  SsdTrainArgs short_args = ssd_args(4, 1024, 16, 32, 64, 1, 64), long_args = short_args;
  long_args.length = 65536;
  MSSM_CHECK(ssd_backward_scratch_bytes(short_args) == ssd_backward_scratch_bytes(long_args),
             "ssd_backward scratch grows with length: %lld vs %lld bytes",
             (long long)ssd_backward_scratch_bytes(short_args), (long long)ssd_backward_scratch_bytes(long_args));
  const double boundary_mb = 4.0 * 16 * 32 * 64 * 4 * (1024 / 64) / 1e6;
  std::printf("  ssd_backward scratch at batch 4, H 16, P 32, N 64, chunk 64, %d threads: %.2f MB at any length "
              "(boundary at length 1024: %.2f MB; per-token states would be %.0f MB)\n",
              num_threads(), ssd_backward_scratch_bytes(long_args) / 1e6, boundary_mb, boundary_mb * 64);
}

// ---- Arguments -----------------------------------------------------------------------------------------------------

void expect_invalid(const char* what, const std::string& field, const std::function<void()>& call) {
  std::string message;
  try {
    call();
  } catch (const std::invalid_argument& e) {
    message = e.what();
  } catch (...) {
    message = "(another exception)";
  }
  MSSM_CHECK(message.find(field) != std::string::npos, "%s: expected std::invalid_argument naming '%s', got '%s'", what,
             field.c_str(), message.c_str());
}

void test_bad_arguments_throw() {
  Rng rng(8);
  Case c(rng, ssd_args(1, 5, 4, 2, 3, 2, 2), true, true);
  Vec y(c.y_size()), boundary(c.boundary_size()), dx(c.x.size()), ddt(c.dt.size()), dA(4), dB(c.B.size()),
      dC(c.C.size());
  SsdTrainGrads<double> g;
  g.dx = dx.data(), g.ddt = ddt.data(), g.dA = dA.data(), g.dB = dB.data(), g.dC = dC.data();
  auto with = [&](const std::function<void(SsdTrainArgs&)>& change) {
    SsdTrainArgs a = c.args;
    change(a);
    return a;
  };
  const SsdTrainArgs bad_groups = with([](SsdTrainArgs& a) { a.groups = 3; });
  const SsdTrainArgs zero_groups = with([](SsdTrainArgs& a) { a.groups = 0; });
  const SsdTrainArgs bad_chunk = with([](SsdTrainArgs& a) { a.chunk = 0; });
  const SsdTrainArgs bad_length = with([](SsdTrainArgs& a) { a.length = -1; });
  auto forward = [&](const SsdTrainArgs& a) {
    return [&, a] { ssd_forward<double>(a, c.tensors(), y.data(), boundary.data()); };
  };
  auto backward = [&](const SsdTrainArgs& a) {
    return [&, a] { ssd_backward<double>(a, c.tensors(), boundary.data(), y.data(), g); };
  };
  expect_invalid("forward, heads 4 groups 3", "groups", forward(bad_groups));
  expect_invalid("forward, heads 4 groups 3", "heads", forward(bad_groups));
  expect_invalid("backward, heads 4 groups 3", "groups", backward(bad_groups));
  expect_invalid("forward, groups 0", "groups", forward(zero_groups));
  expect_invalid("forward, chunk 0", "chunk", forward(bad_chunk));
  expect_invalid("backward, chunk 0", "chunk", backward(bad_chunk));
  expect_invalid("scratch bytes, chunk 0", "chunk", [&] { ssd_backward_scratch_bytes(bad_chunk); });
  expect_invalid("forward, length -1", "length", forward(bad_length));
  // Nothing was written before the throw.
  Vec y2 = poisoned<double>(c.y_size());
  try {
    ssd_forward<double>(bad_chunk, c.tensors(), y2.data(), boundary.data());
  } catch (const std::invalid_argument&) {
  }
  MSSM_CHECK(std::all_of(y2.begin(), y2.end(), [](double v) { return std::isnan(v); }),
             "forward with chunk 0 wrote to y before throwing");
}

}  // namespace

int main() {
  const CpuLevel saved = current_cpu_level();
  for (int level = kCpuLevelCount - 1; level >= 0; --level) {
    if (!cpu_level_supported((CpuLevel)level)) {
      std::printf("(level %s not supported here: skipped)\n", cpu_level_name((CpuLevel)level));
      continue;
    }
    set_cpu_level((CpuLevel)level);
    level_name = cpu_level_name((CpuLevel)level);
    std::printf("train ssd (%s, %d threads)\n", level_name.c_str(), num_threads());
    std::printf("  forward against the recurrence\n");
    test_forward_matches_recurrence();
    std::printf("  gradients against finite differences\n");
    test_gradients_against_finite_differences();
    test_checker_detects_a_wrong_gradient();
    std::printf("  float backward against double\n");
    test_float_backward_matches_double();
    std::printf("  against scan_forward / scan_backward\n");
    test_matches_scan();
    std::printf("  thread-count independence, chunk independence\n");
    test_results_do_not_depend_on_thread_count();
    test_chunk_changes_memory_not_results();
  }
  set_cpu_level(saved);
  std::printf("train ssd: memory and arguments\n");
  test_scratch_does_not_grow_with_length();
  test_bad_arguments_throw();
  std::printf("  worst errors (all levels):\n");
  for (const auto& [key, err] : worst()) std::printf("    %-52s %.3g\n", key.c_str(), err);
  return finish("test_train_ssd");
}
