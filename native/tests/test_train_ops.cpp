// The training ops of native/train/ops.h: every backward (T = double) against central finite
// differences of its own double forward, on tiny awkward shapes; the float forwards against the
// inference kernels; the float backwards against the double ones on a medium shape; thread-count
// independence; and the fused cross-entropy against a direct log-sum-exp reference.
//
// Tolerances:
//  - Gradient checks: the loss is L = Σ out ⊙ R with a random R, differenced with step h = 1e-6; the
//    error is ‖analytic − fd‖₂ / max(‖analytic‖₂, ‖fd‖₂) per input, ≤ 1e-6. The difference quotient's
//    own error is O(h²) truncation plus ~1e-16·|L|/h rounding, about 1e-9 here, so 1e-6 leaves room
//    while any wrong term (a missing factor, a dropped sum) shows at 1e-3 or more.
//  - Float forward vs the inference kernels: |got − want| ≤ 1e-5 · (|want| + floor) per element, with
//    floor = 1e-6·RMS for the norms (no cancelling sums) and RMS for conv1d and the scan (sums that
//    can cancel to near zero, as in test_selective_scan.cpp).
//  - Float backward vs double backward: norm-wise relative error ≤ 1e-4 per gradient.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "../train/ops.h"
#include "train_test_util.h"

using namespace mssm;
using namespace mssm::test;
using namespace mssm::train;

namespace {

constexpr double kForwardTolerance = 1e-5;
constexpr double kFloatGradTolerance = 1e-4;

void expect_gradient(const std::string& op, const std::string& what, const Vec& analytic, Vec& x,
                     const std::function<double()>& loss) {
  const Vec fd = finite_differences(x, loss);
  const double err = norm_error(analytic.data(), fd.data(), fd.size());
  record(op + " grad vs finite differences", err);
  MSSM_CHECK(err <= kGradTolerance, "%s %s: gradient error %.3g vs finite differences (limit %.1g)", op.c_str(),
             what.c_str(), err, kGradTolerance);
}

void expect_float_grad(const std::string& op, const std::string& what, const FVec& got, const Vec& want) {
  const double err = norm_error(got.data(), want.data(), want.size());
  record(op + " float grad vs double", err);
  MSSM_CHECK(err <= kFloatGradTolerance, "%s %s: float gradient error %.3g vs double (limit %.1g)", op.c_str(),
             what.c_str(), err, kFloatGradTolerance);
}

void expect_forward(const std::string& op, const float* got, const float* want, int64_t n, double floor_fraction) {
  const double floor = floor_fraction * rms(want, n);
  record(op + " float forward vs kernels", compare(got, want, n, floor).max_rel);
  expect_close((op + " forward vs inference kernel").c_str(), got, want, n, kForwardTolerance, floor);
}

// A (+=) output starts from these values, so the check also proves the op accumulates.
Vec prefill(Rng& rng, size_t n) { return normals(rng, n); }

// ---- RMSNorm ----

void check_rmsnorm_gradients(Rng& rng, int64_t rows, int64_t dim) {
  const std::string what = "rows " + std::to_string(rows) + " dim " + std::to_string(dim);
  Vec x = normals(rng, rows * dim), w = uniforms(rng, dim, 0.5, 1.5), R = normals(rng, rows * dim);
  const double eps = 1e-5;
  auto loss = [&] {
    Vec out(rows * dim), rstd(rows);
    rmsnorm_forward<double>(x.data(), w.data(), out.data(), rstd.data(), rows, dim, eps);
    return dot(out, R);
  };
  Vec out(rows * dim), rstd(rows);
  rmsnorm_forward<double>(x.data(), w.data(), out.data(), rstd.data(), rows, dim, eps);
  const Vec dx0 = prefill(rng, x.size()), dw0 = prefill(rng, w.size());
  Vec dx = dx0, dw = dw0;
  rmsnorm_backward<double>(R.data(), x.data(), w.data(), rstd.data(), dx.data(), dw.data(), rows, dim);
  expect_gradient("rmsnorm", what + " dx", minus(dx, dx0), x, loss);
  expect_gradient("rmsnorm", what + " dw", minus(dw, dw0), w, loss);
}

// ---- Gated RMSNorm ----

void check_gated_gradients(Rng& rng, int64_t rows, int64_t dim, int64_t group, bool before) {
  const std::string what = "rows " + std::to_string(rows) + " dim " + std::to_string(dim) + " group " +
                           std::to_string(group) + (before ? " norm_before_gate" : " gate_first");
  Vec y = normals(rng, rows * dim), z = normals(rng, rows * dim, 1.5), w = uniforms(rng, dim, 0.5, 1.5);
  const Vec R = normals(rng, rows * dim);
  const double eps = 1e-5;
  const int64_t nr = rows * (dim / group);
  auto loss = [&] {
    Vec out(rows * dim), rstd(nr);
    gated_rmsnorm_forward<double>(y.data(), z.data(), w.data(), out.data(), rstd.data(), rows, dim, group, eps,
                                  before);
    return dot(out, R);
  };
  Vec out(rows * dim), rstd(nr);
  gated_rmsnorm_forward<double>(y.data(), z.data(), w.data(), out.data(), rstd.data(), rows, dim, group, eps, before);
  Vec dy = poisoned<double>(y.size()), dz = poisoned<double>(z.size());
  const Vec dw0 = prefill(rng, w.size());
  Vec dw = dw0;
  gated_rmsnorm_backward<double>(R.data(), y.data(), z.data(), w.data(), rstd.data(), dy.data(), dz.data(), dw.data(),
                                 rows, dim, group, before);
  expect_gradient("gated_rmsnorm", what + " dy", dy, y, loss);
  expect_gradient("gated_rmsnorm", what + " dz", dz, z, loss);
  expect_gradient("gated_rmsnorm", what + " dw", minus(dw, dw0), w, loss);
}

// ---- conv1d ----

void check_conv_gradients(Rng& rng, int64_t batch, int64_t length, int64_t channels, int64_t kernel, bool has_bias,
                          bool silu) {
  const std::string what = "batch " + std::to_string(batch) + " length " + std::to_string(length) + " channels " +
                           std::to_string(channels) + " kernel " + std::to_string(kernel) +
                           (has_bias ? " bias" : "") + (silu ? " silu" : " identity");
  const int64_t n = batch * length * channels;
  Vec x = normals(rng, n), w = normals(rng, channels * kernel, 0.5), bias = normals(rng, channels, 0.5);
  const Vec R = normals(rng, n);
  const double* bp = has_bias ? bias.data() : nullptr;
  auto loss = [&] {
    Vec y(n);
    conv1d_forward<double>(x.data(), w.data(), has_bias ? bias.data() : nullptr, y.data(), batch, length, channels,
                           kernel, silu);
    return dot(y, R);
  };
  Vec dx = poisoned<double>(n);
  const Vec dw0 = prefill(rng, w.size()), db0 = prefill(rng, bias.size());
  Vec dw = dw0, db = db0;
  conv1d_backward<double>(R.data(), x.data(), w.data(), bp, dx.data(), dw.data(), has_bias ? db.data() : nullptr,
                          batch, length, channels, kernel, silu);
  expect_gradient("conv1d", what + " dx", dx, x, loss);
  expect_gradient("conv1d", what + " dw", minus(dw, dw0), w, loss);
  if (has_bias) expect_gradient("conv1d", what + " dbias", minus(db, db0), bias, loss);
}

// ---- Selective scan ----

struct ScanCase {
  ScanArgs args;
  bool has_D, has_z, has_bias;
  bool big_delta;  // one element takes softplus's v > 20 branch
  Vec u, delta, A, B, C, D, z, bias;

  ScanCase(Rng& rng, ScanArgs a, bool D_, bool z_, bool bias_, bool big = false)
      : args(a), has_D(D_), has_z(z_), has_bias(bias_), big_delta(big) {
    const int64_t bl = a.batch * a.length, d = a.channels, n = a.state;
    u = normals(rng, bl * d);
    delta = a.softplus ? uniforms(rng, bl * d, -3.0, 1.0) : uniforms(rng, bl * d, 0.05, 1.0);
    if (big && !delta.empty()) delta[delta.size() / 2] = 25.0;
    A = uniforms(rng, d * n, -2.0, -0.05);
    B = normals(rng, bl * a.groups * n);
    C = normals(rng, bl * a.groups * n);
    this->D = normals(rng, d);
    z = normals(rng, bl * d, 1.5);
    bias = a.softplus ? uniforms(rng, d, -0.5, 0.5) : uniforms(rng, d, 0.0, 0.2);
  }
  template <typename T>
  static ScanTensors<T> tensors(const std::vector<T>& u, const std::vector<T>& delta, const std::vector<T>& A,
                                const std::vector<T>& B, const std::vector<T>& C, const std::vector<T>& D,
                                const std::vector<T>& z, const std::vector<T>& bias, bool has_D, bool has_z,
                                bool has_bias) {
    ScanTensors<T> t;
    t.u = u.data(), t.delta = delta.data(), t.A = A.data(), t.B = B.data(), t.C = C.data();
    t.D = has_D ? D.data() : nullptr;
    t.z = has_z ? z.data() : nullptr;
    t.delta_bias = has_bias ? bias.data() : nullptr;
    return t;
  }
  ScanTensors<double> tensors() const { return tensors(u, delta, A, B, C, D, z, bias, has_D, has_z, has_bias); }
  int64_t boundary_size() const {
    return args.batch * ((args.length + args.chunk - 1) / args.chunk) * args.channels * args.state;
  }
  std::string name() const {
    const ScanArgs& a = args;
    char s[256];
    std::snprintf(s, sizeof s, "batch %lld length %lld channels %lld state %lld groups %lld chunk %lld%s%s%s%s%s%s",
                  (long long)a.batch, (long long)a.length, (long long)a.channels, (long long)a.state,
                  (long long)a.groups, (long long)a.chunk, a.softplus ? " softplus" : "", has_D ? " D" : "",
                  has_z ? " z" : "", has_bias ? " bias" : "", std::isfinite(a.dt_max) || a.dt_min > 0 ? " clamp" : "",
                  big_delta ? " v>20" : "");
    return s;
  }
  // How many dt values the clamp changes (so a clamp case can prove it clamps something).
  int64_t clamped() const {
    int64_t count = 0;
    const int64_t d = args.channels;
    for (size_t i = 0; i < delta.size(); ++i) {
      double v = delta[i] + (has_bias ? bias[i % d] : 0.0);
      if (args.softplus && v <= 20) v = std::log1p(std::exp(v));
      count += v < args.dt_min || v > args.dt_max;
    }
    return count;
  }
};

struct ScanOutputs {
  Vec du, ddelta, dA, dB, dC, dD, dz, dbias;
  ScanGrads<double> grads() {
    ScanGrads<double> g;
    g.du = du.data(), g.ddelta = ddelta.data(), g.dA = dA.data(), g.dB = dB.data(), g.dC = dC.data();
    g.dD = dD.empty() ? nullptr : dD.data();
    g.dz = dz.empty() ? nullptr : dz.data();
    g.ddelta_bias = dbias.empty() ? nullptr : dbias.data();
    return g;
  }
};

// The analytic gradients of the double scan with dy = R; (+=) outputs come back with their prefill
// removed.
ScanOutputs scan_gradients(Rng& rng, const ScanCase& c, const Vec& R) {
  const ScanArgs& a = c.args;
  Vec y(a.batch * a.length * a.channels), boundary(c.boundary_size());
  scan_forward<double>(a, c.tensors(), y.data(), boundary.data());
  const size_t bld = y.size(), bgn = c.B.size();
  ScanOutputs o;
  o.du = poisoned<double>(bld), o.ddelta = poisoned<double>(bld), o.dB = poisoned<double>(bgn),
  o.dC = poisoned<double>(bgn);
  if (c.has_z) o.dz = poisoned<double>(bld);
  const Vec dA0 = prefill(rng, c.A.size()), dD0 = prefill(rng, c.D.size()), db0 = prefill(rng, c.bias.size());
  o.dA = dA0;
  if (c.has_D) o.dD = dD0;
  if (c.has_bias) o.dbias = db0;
  scan_backward<double>(a, c.tensors(), boundary.data(), R.data(), o.grads());
  o.dA = minus(o.dA, dA0);
  if (c.has_D) o.dD = minus(o.dD, dD0);
  if (c.has_bias) o.dbias = minus(o.dbias, db0);
  return o;
}

void check_scan_gradients(Rng& rng, ScanCase c) {
  const ScanArgs& a = c.args;
  const std::string what = c.name();
  const Vec R = normals(rng, a.batch * a.length * a.channels);
  auto loss = [&] {
    Vec y(R.size()), boundary(c.boundary_size());
    scan_forward<double>(a, c.tensors(), y.data(), boundary.data());
    return dot(y, R);
  };
  if (a.dt_min > 0 || std::isfinite(a.dt_max))
    MSSM_CHECK(c.clamped() > 0, "%s: the dt clamp is active for no element", what.c_str());
  // Chunk 0's boundary entry is the zero state.
  {
    Vec y(R.size()), boundary(c.boundary_size(), 1.0);
    scan_forward<double>(a, c.tensors(), y.data(), boundary.data());
    bool zeros = true;
    for (int64_t b = 0; b < a.batch; ++b)
      for (int64_t i = 0; i < a.channels * a.state; ++i)
        zeros = zeros && boundary[b * (c.boundary_size() / a.batch) + i] == 0.0;
    MSSM_CHECK(zeros, "%s: chunk 0's boundary state is not zero", what.c_str());
  }
  ScanOutputs g = scan_gradients(rng, c, R);
  expect_gradient("scan", what + " du", g.du, c.u, loss);
  expect_gradient("scan", what + " ddelta", g.ddelta, c.delta, loss);
  expect_gradient("scan", what + " dA", g.dA, c.A, loss);
  expect_gradient("scan", what + " dB", g.dB, c.B, loss);
  expect_gradient("scan", what + " dC", g.dC, c.C, loss);
  if (c.has_D) expect_gradient("scan", what + " dD", g.dD, c.D, loss);
  if (c.has_z) expect_gradient("scan", what + " dz", g.dz, c.z, loss);
  if (c.has_bias) expect_gradient("scan", what + " ddelta_bias", g.dbias, c.bias, loss);
}

ScanArgs scan_args(int64_t batch, int64_t length, int64_t channels, int64_t state, int64_t groups, int64_t chunk,
                   bool softplus, double dt_min = 0.0, double dt_max = INFINITY) {
  ScanArgs a;
  a.batch = batch, a.length = length, a.channels = channels, a.state = state, a.groups = groups, a.chunk = chunk;
  a.softplus = softplus, a.dt_min = dt_min, a.dt_max = dt_max;
  return a;
}

void test_gradients_against_finite_differences() {
  Rng rng(11);
  for (auto [rows, dim] : {std::pair<int64_t, int64_t>{1, 1}, {3, 7}, {2, 13}, {4, 33}})
    check_rmsnorm_gradients(rng, rows, dim);
  for (bool before : {false, true}) {
    check_gated_gradients(rng, 3, 12, 4, before);
    check_gated_gradients(rng, 2, 10, 5, before);
    check_gated_gradients(rng, 1, 7, 7, before);
    check_gated_gradients(rng, 2, 12, 12, before);
  }
  check_conv_gradients(rng, 2, 7, 5, 4, true, true);
  check_conv_gradients(rng, 1, 1, 3, 4, false, true);
  check_conv_gradients(rng, 2, 13, 11, 3, true, false);
  check_conv_gradients(rng, 1, 7, 17, 1, true, true);
  check_conv_gradients(rng, 1, 3, 5, 6, true, true);  // kernel longer than the sequence
  check_conv_gradients(rng, 2, 13, 19, 4, false, false);

  check_scan_gradients(rng, ScanCase(rng, scan_args(1, 1, 3, 2, 1, 64, true), true, true, true));
  check_scan_gradients(rng, ScanCase(rng, scan_args(2, 7, 6, 3, 2, 3, true, 0.15, 0.8), true, false, true));
  check_scan_gradients(rng, ScanCase(rng, scan_args(1, 13, 5, 4, 1, 1, false, 0.1, 0.7), false, true, false));
  // 17 channels per group: a full block of 16 and a block of 1 in each group.
  check_scan_gradients(rng, ScanCase(rng, scan_args(2, 13, 34, 5, 2, 4, true, 0.2), true, true, true));
  check_scan_gradients(rng, ScanCase(rng, scan_args(1, 7, 4, 3, 2, 100, true), true, true, true, true));
  check_scan_gradients(rng, ScanCase(rng, scan_args(2, 13, 7, 9, 1, 5, false), true, false, false));
}

// ---- One A per channel (Mamba-2's scalar A per head, repeated over the state) ----

// A case whose A is the same for every n of a channel.
ScanCase per_channel_case(Rng& rng, ScanArgs a, bool has_D, bool has_z, bool has_bias) {
  ScanCase c(rng, a, has_D, has_z, has_bias);
  for (int64_t d = 0; d < a.channels; ++d)
    for (int64_t n = 1; n < a.state; ++n) c.A[d * a.state + n] = c.A[d * a.state];
  return c;
}

// Every gradient against finite differences, dA per element: each dA[d, n] holds its own state
// index's share, and the repeated values must not mix them up.
void check_per_channel_gradients(Rng& rng, ScanArgs a, bool has_D, bool has_z, bool has_bias) {
  ScanCase c = per_channel_case(rng, a, has_D, has_z, has_bias);
  const std::string what = c.name() + " one A per channel";
  const Vec R = normals(rng, a.batch * a.length * a.channels);
  auto loss = [&] {
    Vec y(R.size()), boundary(c.boundary_size());
    scan_forward<double>(c.args, c.tensors(), y.data(), boundary.data());
    return dot(y, R);
  };
  ScanOutputs g = scan_gradients(rng, c, R);
  expect_gradient("scan", what + " du", g.du, c.u, loss);
  expect_gradient("scan", what + " ddelta", g.ddelta, c.delta, loss);
  expect_gradient("scan", what + " dA", g.dA, c.A, loss);
  expect_gradient("scan", what + " dB", g.dB, c.B, loss);
  expect_gradient("scan", what + " dC", g.dC, c.C, loss);
  if (c.has_D) expect_gradient("scan", what + " dD", g.dD, c.D, loss);
  if (c.has_z) expect_gradient("scan", what + " dz", g.dz, c.z, loss);
  if (c.has_bias) expect_gradient("scan", what + " ddelta_bias", g.dbias, c.bias, loss);
}

void test_per_channel_A() {
  Rng rng(20);
  check_per_channel_gradients(rng, scan_args(2, 7, 6, 3, 2, 3, true, 0.15, 0.8), true, true, true);
  // 17 channels per group: a full block of 16 and a block of 1 in each group.
  check_per_channel_gradients(rng, scan_args(1, 13, 34, 5, 2, 4, true), true, false, true);
  check_per_channel_gradients(rng, scan_args(1, 9, 5, 4, 1, 100, false, 0.1, 0.7), false, true, false);
}

// The chunk only decides what is stored and recomputed: y and every gradient are the same for any
// chunk, and the backward's scratch does not grow with the length.
void test_chunk_changes_memory_not_results() {
  Rng rng(18);
  ScanCase base(rng, scan_args(2, 23, 20, 6, 2, 64, true, 0.1, 0.9), true, true, true);
  const Vec R = normals(rng, base.u.size());
  ScanOutputs ref;
  for (int64_t chunk : {64, 1, 5, 23, 22}) {
    ScanCase c = base;
    c.args.chunk = chunk;
    Rng prefill_rng(19);
    ScanOutputs g = scan_gradients(prefill_rng, c, R);
    if (chunk == 64) {
      ref = g;
      continue;
    }
    double err = 0;
    const std::pair<const Vec*, const Vec*> pairs[] = {{&g.du, &ref.du}, {&g.ddelta, &ref.ddelta}, {&g.dA, &ref.dA},
                                                       {&g.dB, &ref.dB}, {&g.dC, &ref.dC},         {&g.dD, &ref.dD},
                                                       {&g.dz, &ref.dz}, {&g.dbias, &ref.dbias}};
    for (const auto& [got, want] : pairs) err = std::max(err, norm_error(got->data(), want->data(), want->size()));
    record("scan grads, chunk vs chunk 64", err);
    MSSM_CHECK(err <= 1e-12, "scan chunk %lld: gradients differ from chunk 64 by %.3g", (long long)chunk, err);
  }
  ScanArgs short_args = scan_args(4, 1024, 1536, 16, 1, 64, true), long_args = short_args;
  long_args.length = 8192;
  MSSM_CHECK(scan_backward_scratch_bytes(short_args) == scan_backward_scratch_bytes(long_args),
             "scan_backward scratch grows with length: %lld vs %lld bytes",
             (long long)scan_backward_scratch_bytes(short_args), (long long)scan_backward_scratch_bytes(long_args));
  std::printf("  scan_backward scratch at batch 4, D 1536, N 16, chunk 64, %d threads: %.2f MB at any length\n",
              num_threads(), scan_backward_scratch_bytes(long_args) / 1e6);
}

// ---- The checker can fail ----

void test_checker_detects_a_wrong_gradient() {
  Rng rng(12);
  ScanCase c(rng, scan_args(1, 7, 5, 3, 1, 3, true, 0.15, 0.8), true, true, true);
  const Vec R = normals(rng, c.u.size());
  auto loss = [&] {
    Vec y(R.size()), boundary(c.boundary_size());
    scan_forward<double>(c.args, c.tensors(), y.data(), boundary.data());
    return dot(y, R);
  };
  ScanOutputs g = scan_gradients(rng, c, R);
  const Vec fd = finite_differences(c.u, loss);
  const double right = norm_error(g.du.data(), fd.data(), fd.size());
  // One element off by 1e-4 of the gradient's norm: a far smaller mistake than a wrong term makes.
  Vec wrong = g.du;
  wrong[3] += 1e-4 * std::sqrt(dot(g.du, g.du));
  const double caught = norm_error(wrong.data(), fd.data(), fd.size());
  MSSM_CHECK(right <= kGradTolerance && caught > kGradTolerance,
             "checker: correct du error %.3g, perturbed du error %.3g (limit %.1g): the perturbation was not caught",
             right, caught, kGradTolerance);
  std::printf("  checker: correct du error %.2g, one element perturbed by 1e-4 of the norm: %.2g (limit %.0e)\n",
              right, caught, kGradTolerance);
}

// ---- Float forwards against the inference kernels ----

void test_float_forwards_match_inference_kernels() {
  Rng rng(13);
  const cpu::KernelTable& k = cpu::kernels();
  {
    const int64_t rows = 7, dim = 300;
    const FVec x = rng.normals(rows * dim), w = rng.uniforms(dim, 0.5f, 1.5f);
    FVec got(rows * dim), want(rows * dim), rstd(rows);
    rmsnorm_forward<float>(x.data(), w.data(), got.data(), rstd.data(), rows, dim, 1e-5f);
    k.rmsnorm(x.data(), nullptr, w.data(), want.data(), nullptr, rows, dim, 1e-5f);
    expect_forward("rmsnorm", got.data(), want.data(), rows * dim, 1e-6);
  }
  for (bool before : {false, true})
    for (int64_t group : {32, 96}) {
      const int64_t rows = 5, dim = 96;
      const FVec y = rng.normals(rows * dim), z = rng.normals(rows * dim, 2.0f), w = rng.uniforms(dim, 0.5f, 1.5f);
      FVec got(rows * dim), want(rows * dim), rstd(rows * dim / group);
      gated_rmsnorm_forward<float>(y.data(), z.data(), w.data(), got.data(), rstd.data(), rows, dim, group, 1e-5f,
                                   before);
      k.gated_rmsnorm(y.data(), z.data(), w.data(), want.data(), rows, dim, group, 1e-5f, before);
      expect_forward("gated_rmsnorm", got.data(), want.data(), rows * dim, 1e-6);
    }
  for (bool silu : {true, false}) {
    const int64_t batch = 2, length = 37, channels = 70, kernel = 4;
    const FVec x = rng.normals(batch * length * channels), w = rng.normals(channels * kernel, 0.5f),
               bias = rng.normals(channels, 0.5f);
    FVec got(x.size()), want(x.size());
    conv1d_forward<float>(x.data(), w.data(), bias.data(), got.data(), batch, length, channels, kernel, silu);
    k.conv1d(x.data(), w.data(), bias.data(), nullptr, nullptr, want.data(), batch, length, channels, kernel, silu);
    expect_forward("conv1d", got.data(), want.data(), (int64_t)x.size(), 1.0);
  }
  for (bool has_z : {true, false}) {
    Rng r(14);
    ScanCase c(r, scan_args(2, 100, 48, 16, 2, 64, true), true, has_z, true);
    const FVec u = cast<float>(c.u), delta = cast<float>(c.delta), A = cast<float>(c.A), B = cast<float>(c.B),
               C = cast<float>(c.C), D = cast<float>(c.D), z = cast<float>(c.z), bias = cast<float>(c.bias);
    FVec got(u.size()), want(u.size()), boundary(c.boundary_size());
    scan_forward<float>(c.args, ScanCase::tensors(u, delta, A, B, C, D, z, bias, true, has_z, true), got.data(),
                        boundary.data());
    cpu::SelectiveScanArgs s;
    s.batch = 2, s.length = 100, s.channels = 48, s.state = 16, s.groups = 2;
    s.u = u.data(), s.delta = delta.data(), s.A = A.data(), s.B = B.data(), s.C = C.data(), s.D = D.data();
    s.z = has_z ? z.data() : nullptr, s.delta_bias = bias.data(), s.delta_softplus = true, s.y = want.data();
    k.selective_scan(s);
    expect_forward("scan", got.data(), want.data(), (int64_t)u.size(), 1.0);
  }
}

// ---- Float backwards against double ----

void test_float_backwards_match_double() {
  Rng rng(15);
  {
    const int64_t rows = 64, dim = 256;
    const FVec x = rng.normals(rows * dim), w = rng.uniforms(dim, 0.5f, 1.5f), R = rng.normals(rows * dim);
    FVec out(rows * dim), rstd(rows), dx(rows * dim, 0.0f), dw(dim, 0.0f);
    rmsnorm_forward<float>(x.data(), w.data(), out.data(), rstd.data(), rows, dim, 1e-5f);
    rmsnorm_backward<float>(R.data(), x.data(), w.data(), rstd.data(), dx.data(), dw.data(), rows, dim);
    const Vec xd = cast<double>(x), wd = cast<double>(w), Rd = cast<double>(R);
    Vec outd(rows * dim), rstdd(rows), dxd(rows * dim, 0.0), dwd(dim, 0.0);
    rmsnorm_forward<double>(xd.data(), wd.data(), outd.data(), rstdd.data(), rows, dim, 1e-5);
    rmsnorm_backward<double>(Rd.data(), xd.data(), wd.data(), rstdd.data(), dxd.data(), dwd.data(), rows, dim);
    expect_float_grad("rmsnorm", "dx", dx, dxd);
    expect_float_grad("rmsnorm", "dw", dw, dwd);
  }
  for (bool before : {false, true}) {
    const int64_t rows = 32, dim = 256, group = 64, nr = rows * dim / group;
    const FVec y = rng.normals(rows * dim), z = rng.normals(rows * dim, 1.5f), w = rng.uniforms(dim, 0.5f, 1.5f),
               R = rng.normals(rows * dim);
    FVec out(rows * dim), rstd(nr), dy(rows * dim), dz(rows * dim), dw(dim, 0.0f);
    gated_rmsnorm_forward<float>(y.data(), z.data(), w.data(), out.data(), rstd.data(), rows, dim, group, 1e-5f, before);
    gated_rmsnorm_backward<float>(R.data(), y.data(), z.data(), w.data(), rstd.data(), dy.data(), dz.data(), dw.data(),
                                  rows, dim, group, before);
    const Vec yd = cast<double>(y), zd = cast<double>(z), wd = cast<double>(w), Rd = cast<double>(R);
    Vec outd(rows * dim), rstdd(nr), dyd(rows * dim), dzd(rows * dim), dwd(dim, 0.0);
    gated_rmsnorm_forward<double>(yd.data(), zd.data(), wd.data(), outd.data(), rstdd.data(), rows, dim, group, 1e-5,
                                  before);
    gated_rmsnorm_backward<double>(Rd.data(), yd.data(), zd.data(), wd.data(), rstdd.data(), dyd.data(), dzd.data(),
                                   dwd.data(), rows, dim, group, before);
    expect_float_grad("gated_rmsnorm", "dy", dy, dyd);
    expect_float_grad("gated_rmsnorm", "dz", dz, dzd);
    expect_float_grad("gated_rmsnorm", "dw", dw, dwd);
  }
  {
    const int64_t batch = 2, length = 200, channels = 48, kernel = 4, n = batch * length * channels;
    const FVec x = rng.normals(n), w = rng.normals(channels * kernel, 0.5f), bias = rng.normals(channels, 0.5f),
               R = rng.normals(n);
    FVec dx(n), dw(channels * kernel, 0.0f), db(channels, 0.0f);
    conv1d_backward<float>(R.data(), x.data(), w.data(), bias.data(), dx.data(), dw.data(), db.data(), batch, length,
                           channels, kernel, true);
    const Vec xd = cast<double>(x), wd = cast<double>(w), bd = cast<double>(bias), Rd = cast<double>(R);
    Vec dxd(n), dwd(channels * kernel, 0.0), dbd(channels, 0.0);
    conv1d_backward<double>(Rd.data(), xd.data(), wd.data(), bd.data(), dxd.data(), dwd.data(), dbd.data(), batch,
                            length, channels, kernel, true);
    expect_float_grad("conv1d", "dx", dx, dxd);
    expect_float_grad("conv1d", "dw", dw, dwd);
    expect_float_grad("conv1d", "dbias", db, dbd);
  }
  {
    ScanCase c(rng, scan_args(2, 200, 48, 16, 2, 64, true, 0.01, 1.2), true, true, true);
    const ScanArgs& a = c.args;
    const FVec u = cast<float>(c.u), delta = cast<float>(c.delta), A = cast<float>(c.A), B = cast<float>(c.B),
               C = cast<float>(c.C), D = cast<float>(c.D), z = cast<float>(c.z), bias = cast<float>(c.bias);
    // Compare against the double scan of the same (float-rounded) inputs.
    c.u = cast<double>(u), c.delta = cast<double>(delta), c.A = cast<double>(A), c.B = cast<double>(B),
    c.C = cast<double>(C), c.D = cast<double>(D), c.z = cast<double>(z), c.bias = cast<double>(bias);
    const FVec R = rng.normals(u.size());
    const ScanTensors<float> tf = ScanCase::tensors(u, delta, A, B, C, D, z, bias, true, true, true);
    FVec y(u.size()), boundary(c.boundary_size());
    scan_forward<float>(a, tf, y.data(), boundary.data());
    FVec du(u.size()), ddelta(u.size()), dA(A.size(), 0.0f), dB(B.size()), dC(C.size()), dD(D.size(), 0.0f),
        dz(z.size()), db(bias.size(), 0.0f);
    ScanGrads<float> gf;
    gf.du = du.data(), gf.ddelta = ddelta.data(), gf.dA = dA.data(), gf.dB = dB.data(), gf.dC = dC.data();
    gf.dD = dD.data(), gf.dz = dz.data(), gf.ddelta_bias = db.data();
    const auto start = std::chrono::steady_clock::now();
    scan_backward<float>(a, tf, boundary.data(), R.data(), gf);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();

    Vec yd(u.size()), boundaryd(c.boundary_size());
    scan_forward<double>(a, c.tensors(), yd.data(), boundaryd.data());
    expect_float_grad("scan", "y (forward)", y, yd);
    Rng unused(0);
    ScanOutputs gd;
    gd.du = Vec(u.size()), gd.ddelta = Vec(u.size()), gd.dA = Vec(A.size(), 0.0), gd.dB = Vec(B.size()),
    gd.dC = Vec(C.size()), gd.dD = Vec(D.size(), 0.0), gd.dz = Vec(z.size()), gd.dbias = Vec(bias.size(), 0.0);
    scan_backward<double>(a, c.tensors(), boundaryd.data(), cast<double>(R).data(), gd.grads());
    expect_float_grad("scan", "du", du, gd.du);
    expect_float_grad("scan", "ddelta", ddelta, gd.ddelta);
    expect_float_grad("scan", "dA", dA, gd.dA);
    expect_float_grad("scan", "dB", dB, gd.dB);
    expect_float_grad("scan", "dC", dC, gd.dC);
    expect_float_grad("scan", "dD", dD, gd.dD);
    expect_float_grad("scan", "dz", dz, gd.dz);
    expect_float_grad("scan", "ddelta_bias", db, gd.dbias);
    std::printf("  scan_backward float, batch 2 length 200 channels 48 state 16 chunk 64: %.2f ms, scratch %lld bytes\n",
                ms, (long long)scan_backward_scratch_bytes(a));
  }
}

// ---- Thread-count independence ----

void test_results_do_not_depend_on_thread_count() {
  Rng rng(16);
  const int saved = num_threads();
  // conv1d backward
  {
    const int64_t batch = 2, length = 150, channels = 70, kernel = 4, n = batch * length * channels;
    const FVec x = rng.normals(n), w = rng.normals(channels * kernel, 0.5f), bias = rng.normals(channels, 0.5f),
               R = rng.normals(n);
    FVec ref_dx, ref_dw, ref_db;
    for (int threads : {1, 2, 3}) {
      set_num_threads(threads);
      FVec dx(n), dw(channels * kernel, 0.0f), db(channels, 0.0f);
      conv1d_backward<float>(R.data(), x.data(), w.data(), bias.data(), dx.data(), dw.data(), db.data(), batch, length,
                             channels, kernel, true);
      if (threads == 1) {
        ref_dx = dx, ref_dw = dw, ref_db = db;
        continue;
      }
      const bool same = dx == ref_dx && dw == ref_dw && db == ref_db;
      MSSM_CHECK(same, "conv1d_backward at %d threads differs from 1 thread", threads);
    }
  }
  // scan forward and backward
  {
    ScanCase c(rng, scan_args(2, 130, 80, 16, 2, 32, true, 0.01, 1.5), true, true, true);
    const FVec u = cast<float>(c.u), delta = cast<float>(c.delta), A = cast<float>(c.A), B = cast<float>(c.B),
               C = cast<float>(c.C), D = cast<float>(c.D), z = cast<float>(c.z), bias = cast<float>(c.bias),
               R = rng.normals(u.size());
    const ScanTensors<float> tf = ScanCase::tensors(u, delta, A, B, C, D, z, bias, true, true, true);
    std::vector<FVec> ref;
    for (int threads : {1, 2, 3}) {
      set_num_threads(threads);
      FVec y(u.size()), boundary(c.boundary_size());
      scan_forward<float>(c.args, tf, y.data(), boundary.data());
      FVec du(u.size()), ddelta(u.size()), dA(A.size(), 0.0f), dB(B.size()), dC(C.size()), dD(D.size(), 0.0f),
          dz(z.size()), db(bias.size(), 0.0f);
      ScanGrads<float> g;
      g.du = du.data(), g.ddelta = ddelta.data(), g.dA = dA.data(), g.dB = dB.data(), g.dC = dC.data();
      g.dD = dD.data(), g.dz = dz.data(), g.ddelta_bias = db.data();
      scan_backward<float>(c.args, tf, boundary.data(), R.data(), g);
      std::vector<FVec> all = {y, boundary, du, ddelta, dA, dB, dC, dD, dz, db};
      if (threads == 1) {
        ref = all;
        continue;
      }
      MSSM_CHECK(all == ref, "scan forward/backward at %d threads differs from 1 thread", threads);
    }
  }
  // norms' weight gradients
  {
    const int64_t rows = 300, dim = 200;
    const FVec x = rng.normals(rows * dim), z = rng.normals(rows * dim), w = rng.uniforms(dim, 0.5f, 1.5f),
               R = rng.normals(rows * dim);
    FVec ref;
    for (int threads : {1, 2, 3}) {
      set_num_threads(threads);
      FVec out(rows * dim), rstd(rows), dx(rows * dim, 0.0f), dw(dim, 0.0f), grstd(rows * 4), dy(rows * dim),
          dz(rows * dim), gdw(dim, 0.0f);
      rmsnorm_forward<float>(x.data(), w.data(), out.data(), rstd.data(), rows, dim, 1e-5f);
      rmsnorm_backward<float>(R.data(), x.data(), w.data(), rstd.data(), dx.data(), dw.data(), rows, dim);
      gated_rmsnorm_forward<float>(x.data(), z.data(), w.data(), out.data(), grstd.data(), rows, dim, 50, 1e-5f, false);
      gated_rmsnorm_backward<float>(R.data(), x.data(), z.data(), w.data(), grstd.data(), dy.data(), dz.data(),
                                    gdw.data(), rows, dim, 50, false);
      FVec all = dx;
      for (const FVec* v : {&dw, &dy, &dz, &gdw}) all.insert(all.end(), v->begin(), v->end());
      if (threads == 1) {
        ref = all;
        continue;
      }
      MSSM_CHECK(all == ref, "norm backwards at %d threads differ from 1 thread", threads);
    }
  }
  set_num_threads(saved);
}

// ---- Cross-entropy ----

template <typename T>
void check_cross_entropy(double loss_tolerance, double grad_tolerance) {
  Rng rng(17);
  const int64_t rows = 7, vocab = 37;
  std::vector<T> logits(rows * vocab);
  for (auto& v : logits) v = (T)(rng.normal() * 3.0);
  for (int64_t i = 0; i < vocab; ++i) logits[2 * vocab + i] = (i % 3 == 0) ? T(80) : T(-80);  // no overflow
  for (int64_t i = 0; i < vocab; ++i) logits[5 * vocab + i] = T(-80) + (T)rng.uniform();
  const std::vector<int32_t> targets = {3, -1, 1, 36, -100, 0, 17};
  const T scale = T(0.2);
  // Reference: log-sum-exp in double.
  double want_loss = 0;
  std::vector<double> want_grad(rows * vocab, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] < 0) continue;
    const T* l = logits.data() + r * vocab;
    double top = -INFINITY, sum = 0;
    for (int64_t i = 0; i < vocab; ++i) top = std::max(top, (double)l[i]);
    for (int64_t i = 0; i < vocab; ++i) sum += std::exp((double)l[i] - top);
    want_loss += top + std::log(sum) - (double)l[targets[r]];
    for (int64_t i = 0; i < vocab; ++i)
      want_grad[r * vocab + i] = (double)scale * (std::exp((double)l[i] - top) / sum - (i == targets[r] ? 1.0 : 0.0));
  }
  int64_t count = 10;
  std::vector<T> grad = logits;
  const double loss = cross_entropy<T>(grad.data(), targets.data(), rows, vocab, scale, &count);
  const char* type = sizeof(T) == 4 ? "float" : "double";
  const double loss_err = std::fabs(loss - want_loss) / std::fabs(want_loss);
  record(std::string("cross_entropy ") + type + " loss", loss_err);
  MSSM_CHECK(loss_err <= loss_tolerance, "cross_entropy %s: loss %.9g, want %.9g", type, loss, want_loss);
  MSSM_CHECK(count == 15, "cross_entropy %s: count %lld, want 15 (10 + 5 rows with targets)", type, (long long)count);
  const double floor = 1e-3 * (double)scale;  // the gradient's scale: elements far below it are ~0 by design
  record(std::string("cross_entropy ") + type + " grad", compare(grad.data(), want_grad.data(), rows * vocab, floor).max_rel);
  expect_close((std::string("cross_entropy ") + type + " gradient").c_str(), grad.data(), want_grad.data(),
               rows * vocab, grad_tolerance, floor);
  bool ignored_zero = true;
  for (int64_t r : {1, 4})
    for (int64_t i = 0; i < vocab; ++i) ignored_zero = ignored_zero && grad[r * vocab + i] == T(0);
  MSSM_CHECK(ignored_zero, "cross_entropy %s: ignored rows are not zero", type);

  // A target outside the vocabulary throws, naming row and value, and changes nothing.
  std::vector<int32_t> bad = targets;
  bad[4] = (int32_t)vocab;
  std::vector<T> untouched = logits;
  bool threw = false;
  try {
    cross_entropy<T>(untouched.data(), bad.data(), rows, vocab, scale, nullptr);
  } catch (const std::out_of_range& e) {
    const std::string m = e.what();
    threw = m.find("row 4") != std::string::npos && m.find("37") != std::string::npos;
    if (!threw) std::fprintf(stderr, "message: %s\n", m.c_str());
  }
  MSSM_CHECK(threw, "cross_entropy %s: a target >= vocab did not throw out_of_range naming row 4 and 37", type);
  MSSM_CHECK(untouched == logits, "cross_entropy %s: a throwing call changed the logits", type);
}

}  // namespace

// transpose: exact, at every shape (whole 8 × 8 blocks, edges, one row or one column).
template <typename T>
void check_transpose() {
  Rng rng(31);
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {1, 17}, {17, 1}, {8, 8}, {7, 13}, {64, 9}, {129, 70},
                            {200, 48}, {4, 1024}}) {
    std::vector<T> src(rows * cols), dst(rows * cols, T(-7)), want(rows * cols);
    for (auto& v : src) v = (T)rng.normal();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) want[c * rows + r] = src[r * cols + c];
    transpose(src.data(), rows, cols, dst.data());
    MSSM_CHECK(dst == want, "transpose [%lld, %lld] differs from the naive one", (long long)rows, (long long)cols);
  }
}

// weight_grad against a naive double loop: dw (non-zero on entry) += dyᵀ·x and dbias += Σ_m dy, with and
// without dbias, at awkward shapes (one row, rows not a multiple of the row block, N not a multiple of
// the 4-row tile, K not a multiple of the vector or the 64-wide strip). The error of each element is
// measured relative to Σ_m |dy·x| + |dw on entry| (the sum's own scale, which no cancellation shrinks).
template <typename T>
void check_weight_grad(double tol) {
  Rng rng(41);
  const char* type = std::is_same_v<T, float> ? "float" : "double";
  double worst_err = 0;
  for (int64_t M : {1, 7, 300, 4097})
    for (int64_t N : {1, 3, 5, 48, 130})
      for (int64_t K : {1, 16, 17, 63, 64, 65, 200}) {
        std::vector<T> dy(M * N), x(M * K), dw0(N * K), db0(N);
        for (auto& v : dy) v = (T)rng.normal();
        for (auto& v : x) v = (T)rng.normal();
        for (auto& v : dw0) v = (T)rng.normal();
        for (auto& v : db0) v = (T)rng.normal();
        Vec want(N * K), scale(N * K), want_b(N), scale_b(N);
        for (int64_t n = 0; n < N; ++n) {
          double sb = 0, ab = 0;
          for (int64_t m = 0; m < M; ++m) sb += (double)dy[m * N + n], ab += std::fabs((double)dy[m * N + n]);
          want_b[n] = (double)db0[n] + sb, scale_b[n] = std::fabs((double)db0[n]) + ab;
          for (int64_t k = 0; k < K; ++k) {
            double s = 0, a = 0;
            for (int64_t m = 0; m < M; ++m) {
              const double t = (double)dy[m * N + n] * (double)x[m * K + k];
              s += t, a += std::fabs(t);
            }
            want[n * K + k] = (double)dw0[n * K + k] + s;
            scale[n * K + k] = std::fabs((double)dw0[n * K + k]) + a;
          }
        }
        for (bool with_bias : {false, true}) {
          std::vector<T> dw = dw0, db = db0;
          weight_grad<T>(dy.data(), x.data(), dw.data(), with_bias ? db.data() : nullptr, M, N, K);
          double err = 0;
          for (int64_t i = 0; i < N * K; ++i) err = std::max(err, std::fabs((double)dw[i] - want[i]) / scale[i]);
          for (int64_t n = 0; n < N; ++n) {
            const double e = with_bias ? std::fabs((double)db[n] - want_b[n]) / scale_b[n] : (db[n] == db0[n] ? 0 : 1);
            err = std::max(err, e);
          }
          if (std::isnan(err)) err = INFINITY;
          worst_err = std::max(worst_err, err);
          MSSM_CHECK(err <= tol, "weight_grad %s [M %lld, N %lld, K %lld]%s: error %.3g of Σ|terms| > %.3g", type,
                     (long long)M, (long long)N, (long long)K, with_bias ? " with dbias" : "", err, tol);
        }
        // dw null: the bias alone, with x never read; and the same sums as the tiled path's.
        std::vector<T> db = db0, db_tiled = db0, dw = dw0;
        weight_grad<T>(dy.data(), nullptr, nullptr, db.data(), M, N, K);
        weight_grad<T>(dy.data(), x.data(), dw.data(), db_tiled.data(), M, N, K);
        double err = 0;
        for (int64_t n = 0; n < N; ++n) err = std::max(err, std::fabs((double)db[n] - want_b[n]) / scale_b[n]);
        MSSM_CHECK(err <= tol && db == db_tiled,
                   "weight_grad %s [M %lld, N %lld] dbias alone: error %.3g, %s the tiled path's", type, (long long)M,
                   (long long)N, err, db == db_tiled ? "equal to" : "differs from");
      }
  record(std::string("weight_grad ") + type + " vs naive (of sum |terms|)", worst_err);
}

// weight_grad: bit-identical at 1, 2 and 3 threads (the task grid changes with the thread count).
void check_weight_grad_threads() {
  Rng rng(43);
  const int saved = num_threads();
  for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{4097, 130, 200}, {300, 48, 65}, {1000, 1024, 72},
                         {513, 512, 16}, {2000, 256, 512}}) {
    FVec dy = rng.normals(M * N), x = rng.normals(M * K), dw0 = rng.normals(N * K), db0 = rng.normals(N);
    FVec ref_dw, ref_db;
    for (int threads : {1, 2, 3}) {
      set_num_threads(threads);
      FVec dw = dw0, db = db0;
      weight_grad<float>(dy.data(), x.data(), dw.data(), db.data(), M, N, K);
      if (threads == 1) {
        ref_dw = dw, ref_db = db;
        continue;
      }
      MSSM_CHECK(dw == ref_dw && db == ref_db, "weight_grad [M %lld, N %lld, K %lld] at %d threads differs from 1 thread",
                 (long long)M, (long long)N, (long long)K, threads);
    }
  }
  set_num_threads(saved);
}

int main() {
  std::printf("train ops: gradients against finite differences\n");
  test_gradients_against_finite_differences();
  test_checker_detects_a_wrong_gradient();
  test_chunk_changes_memory_not_results();
  std::printf("train ops: one A per channel against finite differences\n");
  test_per_channel_A();
  std::printf("train ops: float forwards against the inference kernels (%s)\n", cpu::kernels().level);
  test_float_forwards_match_inference_kernels();
  std::printf("train ops: float backwards against double\n");
  test_float_backwards_match_double();
  std::printf("train ops: thread-count independence\n");
  test_results_do_not_depend_on_thread_count();
  std::printf("train ops: cross-entropy\n");
  check_cross_entropy<float>(1e-6, 1e-5);
  check_cross_entropy<double>(1e-12, 1e-12);
  std::printf("train ops: transpose\n");
  check_transpose<float>();
  check_transpose<double>();
  // Every level this CPU runs: each has its own tile (AVX-512 reads full tiles in place, AVX2 and
  // baseline pack them).
  const CpuLevel saved_level = current_cpu_level();
  for (int level = 0; level < kCpuLevelCount; ++level) {
    if (!cpu_level_supported((CpuLevel)level)) continue;
    set_cpu_level((CpuLevel)level);
    std::printf("train ops: weight_grad (%s)\n", cpu::kernels().level);
    check_weight_grad<float>(1e-5);
  }
  set_cpu_level(saved_level);
  check_weight_grad<double>(1e-13);
  check_weight_grad_threads();
  std::printf("  worst errors:\n");
  for (const auto& [key, err] : worst()) std::printf("    %-48s %.3g\n", key.c_str(), err);
  return finish("test_train_ops");
}
