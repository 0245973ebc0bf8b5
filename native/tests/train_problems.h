// The problems of the training scans' tests on the device (test_cuda_scan_train) and of their block
// code on the host (test_scan_train_blocks, test_ssd_backward_blocks): shapes, float inputs (what a
// device gets), and the CPU trainer's double forward and backward on the same values (themselves
// checked against finite differences in test_train_ops and test_train_ssd). The (+=) gradients start
// from a random prefill, which an absent D, z or bias must leave as it is.
//
// The shapes: length 1; chunks that do and do not divide the length; chunk ≥ length; sizes that are
// not multiples of 16 or of the warp; state sizes in each of the recurrent kernels' register layouts
// (N ≤ 32, 64, 128, 256) and over several 64-column tiles; groups 1, 2 and 3; the dt clamp; no
// softplus; D, z and dt_bias each present or absent.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "train/ops.h"
#include "train/ssd_chunked.h"
#include "train_test_util.h"

namespace mssm::test {

struct SsdTrainShape {
  int64_t batch, length, heads, head_dim, state, groups, chunk;
  bool softplus;
  double dt_min, dt_max;
  bool has_D, has_bias;
};

inline std::string describe(const SsdTrainShape& s) {
  return "B" + std::to_string(s.batch) + " L" + std::to_string(s.length) + " H" + std::to_string(s.heads) + " P" +
         std::to_string(s.head_dim) + " N" + std::to_string(s.state) + " G" + std::to_string(s.groups) + " chunk" +
         std::to_string(s.chunk) + (s.softplus ? "" : " no-softplus") + (s.dt_min > 0 ? " clamped" : "") +
         (s.has_D ? " D" : "") + (s.has_bias ? " bias" : "");
}

inline const std::vector<SsdTrainShape>& ssd_train_shapes() {
  static const std::vector<SsdTrainShape> shapes = {
      {1, 1, 2, 3, 4, 1, 64, true, 0.0, INFINITY, true, true},
      {2, 37, 6, 16, 12, 2, 8, true, 0.0, INFINITY, true, true},
      {1, 70, 4, 8, 64, 1, 16, true, 0.0, INFINITY, false, true},
      {2, 40, 3, 5, 40, 3, 64, true, 0.05, 0.5, true, false},
      {1, 33, 4, 4, 130, 2, 10, false, 0.0, INFINITY, true, true},
      {2, 50, 4, 16, 128, 2, 32, true, 0.0, INFINITY, true, true},
      {1, 150, 2, 64, 48, 1, 64, true, 0.0, INFINITY, true, true},
      {1, 200, 4, 64, 128, 1, 64, true, 0.0, INFINITY, true, true},
      {1, 45, 3, 20, 33, 3, 50, true, 0.0, INFINITY, false, false},
  };
  return shapes;
}

struct ScanTrainShape {
  int64_t batch, length, channels, state, groups, chunk;
  bool softplus;
  double dt_min, dt_max;
  bool has_D, has_z, has_bias;
};

inline std::string describe(const ScanTrainShape& s) {
  return "B" + std::to_string(s.batch) + " L" + std::to_string(s.length) + " D" + std::to_string(s.channels) + " N" +
         std::to_string(s.state) + " G" + std::to_string(s.groups) + " chunk" + std::to_string(s.chunk) +
         (s.softplus ? "" : " no-softplus") + (s.dt_min > 0 ? " clamped" : "") + (s.has_D ? " D" : "") +
         (s.has_z ? " z" : "") + (s.has_bias ? " bias" : "");
}

inline const std::vector<ScanTrainShape>& scan_train_shapes() {
  static const std::vector<ScanTrainShape> shapes = {
      {1, 1, 5, 1, 1, 64, true, 0.0, INFINITY, true, true, true},
      {2, 37, 24, 16, 2, 8, true, 0.0, INFINITY, true, true, true},
      {1, 100, 37, 33, 1, 16, true, 0.0, INFINITY, false, true, false},
      {3, 65, 48, 64, 3, 64, true, 0.0, INFINITY, true, false, true},
      {1, 20, 8, 130, 1, 7, true, 0.0, INFINITY, true, true, false},
      {2, 30, 16, 8, 1, 10, true, 0.05, 0.5, true, true, true},
      {2, 33, 12, 4, 2, 5, false, 0.0, INFINITY, false, false, false},
      {1, 257, 64, 16, 1, 64, true, 0.0, INFINITY, true, true, true},
      {2, 40, 16, 128, 2, 16, true, 0.0, INFINITY, true, true, true},
  };
  return shapes;
}

// The plain scan (train/ops.h).
struct ScanProblem {
  ScanTrainShape s;
  train::ScanArgs a;
  FVec u, delta, A, B, C, D, z, bias, dy, dA0, dD0, db0;  // inputs, and the (+=) gradients' prefill
  Vec y, boundary;                                        // the double forward
  Vec du, ddelta, dA, dB, dC, dD, dz, db;                 // the double backward
};

inline ScanProblem make_scan_problem(Rng& rng, const ScanTrainShape& s) {
  ScanProblem p;
  p.s = s;
  train::ScanArgs& a = p.a;
  a.batch = s.batch, a.length = s.length, a.channels = s.channels, a.state = s.state, a.groups = s.groups;
  a.chunk = s.chunk, a.softplus = s.softplus, a.dt_min = s.dt_min, a.dt_max = s.dt_max;
  const int64_t BLD = s.batch * s.length * s.channels, BLGN = s.batch * s.length * s.groups * s.state;
  const int64_t DN = s.channels * s.state, chunks = (s.length + s.chunk - 1) / s.chunk;
  p.u = rng.normals(BLD), p.B = rng.normals(BLGN), p.C = rng.normals(BLGN), p.D = rng.normals(s.channels);
  p.delta = s.softplus ? rng.uniforms(BLD, -3.0f, 1.0f) : rng.uniforms(BLD, 0.05f, 1.0f);
  p.A = rng.uniforms(DN, -2.0f, -0.05f), p.z = rng.normals(BLD, 1.5f), p.bias = rng.uniforms(s.channels, -0.5f, 0.5f);
  p.dy = rng.normals(BLD);
  p.dA0 = rng.normals(DN), p.dD0 = rng.normals(s.channels), p.db0 = rng.normals(s.channels);
  const Vec u(cast<double>(p.u)), B(cast<double>(p.B)), C(cast<double>(p.C)), D(cast<double>(p.D)),
      delta(cast<double>(p.delta)), A(cast<double>(p.A)), z(cast<double>(p.z)), bias(cast<double>(p.bias)),
      dy(cast<double>(p.dy));
  train::ScanTensors<double> t;
  t.u = u.data(), t.delta = delta.data(), t.A = A.data(), t.B = B.data(), t.C = C.data();
  t.D = s.has_D ? D.data() : nullptr;
  t.z = s.has_z ? z.data() : nullptr;
  t.delta_bias = s.has_bias ? bias.data() : nullptr;
  p.y.assign(BLD, 0), p.boundary.assign(s.batch * chunks * DN, 0);
  train::scan_forward<double>(a, t, p.y.data(), p.boundary.data());
  p.du.assign(BLD, 0), p.ddelta.assign(BLD, 0), p.dB.assign(BLGN, 0), p.dC.assign(BLGN, 0), p.dz.assign(BLD, 0);
  p.dA = cast<double>(p.dA0), p.dD = cast<double>(p.dD0), p.db = cast<double>(p.db0);
  train::ScanGrads<double> g;
  g.du = p.du.data(), g.ddelta = p.ddelta.data(), g.dA = p.dA.data(), g.dB = p.dB.data(), g.dC = p.dC.data();
  g.dD = s.has_D ? p.dD.data() : nullptr;
  g.dz = s.has_z ? p.dz.data() : nullptr;
  g.ddelta_bias = s.has_bias ? p.db.data() : nullptr;
  train::scan_backward<double>(a, t, p.boundary.data(), dy.data(), g);
  return p;
}

// Mamba-2's SSD (train/ssd_chunked.h).
struct SsdProblem {
  SsdTrainShape s;
  train::SsdTrainArgs a;
  FVec x, dt, A, B, C, D, bias, dy, dA0, dD0, db0;  // inputs, and the (+=) gradients' prefill
  Vec y, boundary;                                  // the double forward
  Vec dx, ddt, dA, dB, dC, dD, db;                  // the double backward
};

inline SsdProblem make_ssd_problem(Rng& rng, const SsdTrainShape& s) {
  SsdProblem p;
  p.s = s;
  train::SsdTrainArgs& a = p.a;
  a.batch = s.batch, a.length = s.length, a.heads = s.heads, a.head_dim = s.head_dim, a.state = s.state;
  a.groups = s.groups, a.chunk = s.chunk, a.softplus = s.softplus, a.dt_min = s.dt_min, a.dt_max = s.dt_max;
  const int64_t BL = s.batch * s.length, H = s.heads, HP = H * s.head_dim, GN = s.groups * s.state;
  const int64_t chunks = (s.length + s.chunk - 1) / s.chunk;
  p.x = rng.normals(BL * HP), p.B = rng.normals(BL * GN), p.C = rng.normals(BL * GN), p.D = rng.normals(H);
  p.dt = s.softplus ? rng.uniforms(BL * H, -3.0f, 1.0f) : rng.uniforms(BL * H, 0.05f, 1.0f);
  p.A = rng.uniforms(H, -2.0f, -0.05f), p.bias = rng.uniforms(H, -0.5f, 0.5f), p.dy = rng.normals(BL * HP);
  p.dA0 = rng.normals(H), p.dD0 = rng.normals(H), p.db0 = rng.normals(H);
  const Vec x(cast<double>(p.x)), B(cast<double>(p.B)), C(cast<double>(p.C)), D(cast<double>(p.D)),
      dt(cast<double>(p.dt)), A(cast<double>(p.A)), bias(cast<double>(p.bias)), dy(cast<double>(p.dy));
  train::SsdTrainTensors<double> t;
  t.x = x.data(), t.dt = dt.data(), t.A = A.data(), t.B = B.data(), t.C = C.data();
  t.D = s.has_D ? D.data() : nullptr;
  t.dt_bias = s.has_bias ? bias.data() : nullptr;
  p.y.assign(BL * HP, 0), p.boundary.assign(s.batch * chunks * HP * s.state, 0);
  train::ssd_forward<double>(a, t, p.y.data(), p.boundary.data());
  p.dx.assign(BL * HP, 0), p.ddt.assign(BL * H, 0), p.dB.assign(BL * GN, 0), p.dC.assign(BL * GN, 0);
  p.dA = cast<double>(p.dA0), p.dD = cast<double>(p.dD0), p.db = cast<double>(p.db0);
  train::SsdTrainGrads<double> g;
  g.dx = p.dx.data(), g.ddt = p.ddt.data(), g.dA = p.dA.data(), g.dB = p.dB.data(), g.dC = p.dC.data();
  g.dD = s.has_D ? p.dD.data() : nullptr;
  g.ddt_bias = s.has_bias ? p.db.data() : nullptr;
  train::ssd_backward<double>(a, t, p.boundary.data(), dy.data(), g);
  return p;
}

// A backward's gradients (any type: host vectors, device buffers) against the problem's double ones:
// check(name, got, want) for each. The (+=) ones of an absent D or bias must come back as their
// prefill, which the problem's hold then; dz is checked only with z.
template <typename G, typename Check>
void check_scan_gradients(const ScanProblem& p, const G& du, const G& ddelta, const G& dA, const G& dB, const G& dC,
                          const G& dD, const G& dz, const G& ddelta_bias, Check check) {
  check("du", du, p.du);
  check("ddelta", ddelta, p.ddelta);
  check("dA", dA, p.dA);
  check("dB", dB, p.dB);
  check("dC", dC, p.dC);
  check("dD", dD, p.dD);
  if (p.s.has_z) check("dz", dz, p.dz);
  check("ddelta_bias", ddelta_bias, p.db);
}
template <typename G, typename Check>
void check_ssd_gradients(const SsdProblem& p, const G& dx, const G& ddt, const G& dA, const G& dB, const G& dC,
                         const G& dD, const G& ddt_bias, Check check) {
  check("dx", dx, p.dx);
  check("ddt", ddt, p.ddt);
  check("dA", dA, p.dA);
  check("dB", dB, p.dB);
  check("dC", dC, p.dC);
  check("dD", dD, p.dD);
  check("ddt_bias", ddt_bias, p.db);
}

}  // namespace mssm::test
