// The selective scan for training on the device (scan_train.cu) against the CPU trainer's double
// forward and backward (native/train/ops.h, themselves checked against finite differences in
// test_train_ops), and Mamba-2's form of it (ssd_train_*) against the trainer's chunked SSD
// (native/train/ssd_chunked.h): y and the chunk-boundary states, then every gradient, on shapes with state sizes in
// each of the kernel's register layouts (N ≤ 32, 64, 128, 256), groups, chunks that do and do not
// divide the length, a one-token sequence, the dt clamp, no softplus, and D, z and delta_bias each
// present or absent. The (+=) gradients start from a random prefill, which must survive.
// The SSD's backward runs in each of its forms: recurrent, chunked with fp32 tiles, and chunked with
// split bf16 tiles on the tensor cores (whose host emulation, test_ssd_backward_blocks, stays within
// 4.2e-5 on these shapes, dA the worst).
// Tolerances: y and boundary 1e-5 relative to |want| + RMS(want), as test_cuda_selective_scan (float
// against double: sums over N that cancel; a host copy of the kernel's float arithmetic reached 1.3e-6);
// gradients 1e-4 in the norm measure of test_train_ops (‖got − want‖ / ‖want‖), its limit for the CPU's
// own float backward against the double one.
#include <functional>

#include "test_cuda_util.h"
#include "tests/ssd_train_shapes.h"
#include "tests/train_test_util.h"
#include "train/ops.h"

using namespace mssm;
using namespace mssm::test;

namespace {

struct Shape {
  int64_t batch, length, channels, state, groups, chunk;
  bool softplus;
  double dt_min, dt_max;
  bool has_D, has_z, has_bias;
};

FVec to_float(const Vec& v) { return FVec(v.begin(), v.end()); }

// A device gradient against the double backward's, in test_train_ops's norm measure.
void expect_grad(const std::string& what, const char* name, const DeviceBuffer& got, const Vec& want) {
  const FVec v = got.download();
  const double err = norm_error(v.data(), want.data(), want.size());
  MSSM_CHECK(err <= 1e-4, "%s %s: error %.3g vs the double backward (limit 1e-4)", what.c_str(), name, err);
}
Vec to_double(const FVec& v) { return Vec(v.begin(), v.end()); }

void run(Rng& rng, const Shape& s) {
  train::ScanArgs a;
  a.batch = s.batch, a.length = s.length, a.channels = s.channels, a.state = s.state, a.groups = s.groups;
  a.chunk = s.chunk, a.softplus = s.softplus, a.dt_min = s.dt_min, a.dt_max = s.dt_max;
  const int64_t BLD = s.batch * s.length * s.channels, BLGN = s.batch * s.length * s.groups * s.state;
  const int64_t DN = s.channels * s.state, chunks = (s.length + s.chunk - 1) / s.chunk;
  const int64_t boundary_n = s.batch * chunks * DN;
  // Float inputs (what the device gets); the reference computes in double from the same values.
  const FVec u = rng.normals(BLD), B = rng.normals(BLGN), C = rng.normals(BLGN), D = rng.normals(s.channels);
  const FVec delta = s.softplus ? rng.uniforms(BLD, -3.0f, 1.0f) : rng.uniforms(BLD, 0.05f, 1.0f);
  const FVec A = rng.uniforms(DN, -2.0f, -0.05f), z = rng.normals(BLD, 1.5f), bias = rng.uniforms(s.channels, -0.5f, 0.5f);
  const FVec dy = rng.normals(BLD);
  const Vec u64(to_double(u)), B64(to_double(B)), C64(to_double(C)), D64(to_double(D)), delta64(to_double(delta)),
      A64(to_double(A)), z64(to_double(z)), bias64(to_double(bias)), dy64(to_double(dy));

  train::ScanTensors<double> rt;
  rt.u = u64.data(), rt.delta = delta64.data(), rt.A = A64.data(), rt.B = B64.data(), rt.C = C64.data();
  rt.D = s.has_D ? D64.data() : nullptr;
  rt.z = s.has_z ? z64.data() : nullptr;
  rt.delta_bias = s.has_bias ? bias64.data() : nullptr;
  Vec y_ref(BLD), boundary_ref(boundary_n);
  train::scan_forward<double>(a, rt, y_ref.data(), boundary_ref.data());
  // (+=) gradients start from the same random prefill on both sides.
  const FVec dA0 = rng.normals(DN), dD0 = rng.normals(s.channels), db0 = rng.normals(s.channels);
  Vec r_du(BLD), r_ddelta(BLD), r_dA(to_double(dA0)), r_dB(BLGN), r_dC(BLGN), r_dD(to_double(dD0)), r_dz(BLD),
      r_db(to_double(db0));
  train::ScanGrads<double> rg;
  rg.du = r_du.data(), rg.ddelta = r_ddelta.data(), rg.dA = r_dA.data(), rg.dB = r_dB.data(), rg.dC = r_dC.data();
  rg.dD = s.has_D ? r_dD.data() : nullptr;
  rg.dz = s.has_z ? r_dz.data() : nullptr;
  rg.ddelta_bias = s.has_bias ? r_db.data() : nullptr;
  train::scan_backward<double>(a, rt, boundary_ref.data(), dy64.data(), rg);

  DeviceBuffer gu(u), gdelta(delta), gA(A), gB(B), gC(C), gD(D), gz(z), gbias(bias), gdy(dy);
  DeviceBuffer y(BLD), boundary(boundary_n), du(BLD), ddelta(BLD), dA(dA0), dB(BLGN), dC(BLGN), dD(dD0), dz(BLD),
      db(db0);
  for (DeviceBuffer* p : {&y, &boundary, &du, &ddelta, &dB, &dC, &dz}) p->poison();
  train::ScanTensors<float> t;
  t.u = gu.ptr, t.delta = gdelta.ptr, t.A = gA.ptr, t.B = gB.ptr, t.C = gC.ptr;
  t.D = s.has_D ? gD.ptr : nullptr;
  t.z = s.has_z ? gz.ptr : nullptr;
  t.delta_bias = s.has_bias ? gbias.ptr : nullptr;
  const std::string what = "scan_train B" + std::to_string(s.batch) + " L" + std::to_string(s.length) + " D" +
                           std::to_string(s.channels) + " N" + std::to_string(s.state) + " G" +
                           std::to_string(s.groups) + " chunk" + std::to_string(s.chunk) +
                           (s.softplus ? "" : " no-softplus") + (s.dt_min > 0 ? " clamped" : "") +
                           (s.has_D ? " D" : "") + (s.has_z ? " z" : "") + (s.has_bias ? " bias" : "");
  KERNEL_OK(cuda::scan_train_forward(a, t, y.ptr, boundary.ptr, nullptr));
  expect_gpu_close(what + " y", y.download(), to_float(y_ref), 1e-5, rms(y_ref.data(), BLD));
  expect_gpu_close(what + " boundary", boundary.download(), to_float(boundary_ref), 1e-5,
                   rms(boundary_ref.data(), boundary_n) + 1e-30);

  train::ScanGrads<float> g;
  g.du = du.ptr, g.ddelta = ddelta.ptr, g.dA = dA.ptr, g.dB = dB.ptr, g.dC = dC.ptr;
  g.dD = s.has_D ? dD.ptr : nullptr;
  g.dz = s.has_z ? dz.ptr : nullptr;
  g.ddelta_bias = s.has_bias ? db.ptr : nullptr;
  void* work = nullptr;
  CUDA_OK(cudaMalloc(&work, std::max<size_t>(cuda::scan_train_backward_workspace_bytes(a), 4)));
  KERNEL_OK(cuda::scan_train_backward(a, t, boundary.ptr, gdy.ptr, g, work, nullptr));
  cudaFree(work);
  auto grad = [&](const char* name, const DeviceBuffer& got, const Vec& want) { expect_grad(what, name, got, want); };
  grad("du", du, r_du);
  grad("ddelta", ddelta, r_ddelta);
  grad("dA", dA, r_dA);
  grad("dB", dB, r_dB);
  grad("dC", dC, r_dC);
  if (s.has_D) grad("dD", dD, r_dD);
  if (s.has_z) grad("dz", dz, r_dz);
  if (s.has_bias) grad("ddelta_bias", db, r_db);
}

void run_ssd(Rng& rng, const SsdTrainShape& s) {
  train::SsdTrainArgs a;
  a.batch = s.batch, a.length = s.length, a.heads = s.heads, a.head_dim = s.head_dim, a.state = s.state;
  a.groups = s.groups, a.chunk = s.chunk, a.softplus = s.softplus, a.dt_min = s.dt_min, a.dt_max = s.dt_max;
  const int64_t BL = s.batch * s.length, H = s.heads, HP = s.heads * s.head_dim, GN = s.groups * s.state;
  const int64_t chunks = (s.length + s.chunk - 1) / s.chunk, boundary_n = s.batch * chunks * HP * s.state;
  const FVec x = rng.normals(BL * HP), B = rng.normals(BL * GN), C = rng.normals(BL * GN), D = rng.normals(H);
  const FVec dt = s.softplus ? rng.uniforms(BL * H, -3.0f, 1.0f) : rng.uniforms(BL * H, 0.05f, 1.0f);
  const FVec A = rng.uniforms(H, -2.0f, -0.05f), bias = rng.uniforms(H, -0.5f, 0.5f), dy = rng.normals(BL * HP);
  const Vec x64(to_double(x)), B64(to_double(B)), C64(to_double(C)), D64(to_double(D)), dt64(to_double(dt)),
      A64(to_double(A)), bias64(to_double(bias)), dy64(to_double(dy));
  train::SsdTrainTensors<double> rt;
  rt.x = x64.data(), rt.dt = dt64.data(), rt.A = A64.data(), rt.B = B64.data(), rt.C = C64.data();
  rt.D = s.has_D ? D64.data() : nullptr;
  rt.dt_bias = s.has_bias ? bias64.data() : nullptr;
  Vec y_ref(BL * HP), boundary_ref(boundary_n);
  train::ssd_forward<double>(a, rt, y_ref.data(), boundary_ref.data());
  const FVec dA0 = rng.normals(H), dD0 = rng.normals(H), db0 = rng.normals(H);
  Vec r_dx(BL * HP), r_ddt(BL * H), r_dA(to_double(dA0)), r_dB(BL * GN), r_dC(BL * GN), r_dD(to_double(dD0)),
      r_db(to_double(db0));
  train::SsdTrainGrads<double> rg;
  rg.dx = r_dx.data(), rg.ddt = r_ddt.data(), rg.dA = r_dA.data(), rg.dB = r_dB.data(), rg.dC = r_dC.data();
  rg.dD = s.has_D ? r_dD.data() : nullptr;
  rg.ddt_bias = s.has_bias ? r_db.data() : nullptr;
  train::ssd_backward<double>(a, rt, boundary_ref.data(), dy64.data(), rg);

  DeviceBuffer gx(x), gdt(dt), gA(A), gB(B), gC(C), gD(D), gbias(bias), gdy(dy);
  DeviceBuffer y(BL * HP), boundary(boundary_n), dx(BL * HP), ddt(BL * H), dA(dA0), dB(BL * GN), dC(BL * GN), dD(dD0),
      db(db0);
  for (DeviceBuffer* p : {&y, &boundary, &dx, &ddt, &dB, &dC}) p->poison();
  train::SsdTrainTensors<float> t;
  t.x = gx.ptr, t.dt = gdt.ptr, t.A = gA.ptr, t.B = gB.ptr, t.C = gC.ptr;
  t.D = s.has_D ? gD.ptr : nullptr;
  t.dt_bias = s.has_bias ? gbias.ptr : nullptr;
  const std::string what = "ssd_train " + describe(s);
  KERNEL_OK(cuda::ssd_train_forward(a, t, y.ptr, boundary.ptr, nullptr));
  expect_gpu_close(what + " y", y.download(), to_float(y_ref), 1e-5, rms(y_ref.data(), BL * HP));
  expect_gpu_close(what + " boundary", boundary.download(), to_float(boundary_ref), 1e-5,
                   rms(boundary_ref.data(), boundary_n) + 1e-30);
  // Each form of the backward, from the forward's boundary states and fresh outputs.
  struct Form {
    cuda::SsdBackwardForm form;
    cuda::SsdMath math;
    const char* name;
  };
  const Form forms[] = {{cuda::SsdBackwardForm::recurrent, cuda::SsdMath::fp32, "recurrent"},
                        {cuda::SsdBackwardForm::chunked, cuda::SsdMath::fp32, "chunked fp32"},
                        {cuda::SsdBackwardForm::chunked, cuda::SsdMath::bf16_tensor, "chunked split-bf16"}};
  for (const Form& f : forms) {
    if (f.form == cuda::SsdBackwardForm::chunked &&
        cuda::ssd_train_backward_form(a, f.math) != cuda::SsdBackwardForm::chunked) {
      // This device's shared memory cannot hold the tiles (an sm_86 or sm_89 card, say): the call must
      // say so rather than run.
      std::printf("  %s %s: skipped, its tiles do not fit this device's shared memory\n", what.c_str(), f.name);
      train::SsdTrainGrads<float> g;
      g.dx = dx.ptr, g.ddt = ddt.ptr, g.dA = dA.ptr, g.dB = dB.ptr, g.dC = dC.ptr;
      void* work = nullptr;
      CUDA_OK(cudaMalloc(&work, std::max<size_t>(cuda::ssd_train_backward_workspace_bytes(a), 4)));
      MSSM_CHECK(!cuda::ssd_train_backward(a, t, boundary.ptr, gdy.ptr, g, work, nullptr, f.form, f.math).ok(),
                 "%s %s: refused when the tiles do not fit", what.c_str(), f.name);
      cudaFree(work);
      continue;
    }
    dA.upload(dA0), dD.upload(dD0), db.upload(db0);
    for (DeviceBuffer* p : {&dx, &ddt, &dB, &dC}) p->poison();
    train::SsdTrainGrads<float> g;
    g.dx = dx.ptr, g.ddt = ddt.ptr, g.dA = dA.ptr, g.dB = dB.ptr, g.dC = dC.ptr, g.dD = dD.ptr, g.ddt_bias = db.ptr;
    void* work = nullptr;
    CUDA_OK(cudaMalloc(&work, std::max<size_t>(cuda::ssd_train_backward_workspace_bytes(a, f.form), 4)));
    KERNEL_OK(cuda::ssd_train_backward(a, t, boundary.ptr, gdy.ptr, g, work, nullptr, f.form, f.math));
    cudaFree(work);
    const std::string form_what = what + " " + f.name;
    auto grad = [&](const char* name, const DeviceBuffer& got, const Vec& want) {
      expect_grad(form_what, name, got, want);
    };
    grad("dx", dx, r_dx);
    grad("ddt", ddt, r_ddt);
    grad("dA", dA, r_dA);
    grad("dB", dB, r_dB);
    grad("dC", dC, r_dC);
    // Absent D or dt_bias: their gradients are ignored, so the prefill must come back untouched.
    grad("dD", dD, s.has_D ? r_dD : to_double(dD0));
    grad("ddt_bias", db, s.has_bias ? r_db : to_double(db0));
  }
}

}  // namespace

int main() {
  const int code = device_or_exit_code("test_cuda_scan_train");
  if (code >= 0) return code;
  Rng rng(29);
  const Shape shapes[] = {
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
  for (const Shape& s : shapes) run(rng, s);
  for (const SsdTrainShape& s : ssd_train_shapes()) run_ssd(rng, s);
  train::SsdTrainArgs bad_ssd;
  bad_ssd.heads = 3, bad_ssd.head_dim = 2, bad_ssd.state = 2, bad_ssd.groups = 2;  // 6 channels, but 3 heads
  MSSM_CHECK(!cuda::ssd_train_forward(bad_ssd, {}, nullptr, nullptr, nullptr).ok(), "groups not dividing heads");
  train::ScanArgs bad;
  bad.channels = 6, bad.groups = 4, bad.state = 2;
  MSSM_CHECK(!cuda::scan_train_forward(bad, {}, nullptr, nullptr, nullptr).ok(), "groups not dividing channels");
  bad.groups = 1, bad.state = 300;
  MSSM_CHECK(!cuda::scan_train_forward(bad, {}, nullptr, nullptr, nullptr).ok(), "state above 256");
  return finish("test_cuda_scan_train");
}
