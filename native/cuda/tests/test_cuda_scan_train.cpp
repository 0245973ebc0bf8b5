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
#include "tests/train_problems.h"
#include "tests/train_test_util.h"
#include "train/ops.h"

using namespace mssm;
using namespace mssm::test;

namespace {

FVec to_float(const Vec& v) { return FVec(v.begin(), v.end()); }

// A device gradient against the double backward's, in test_train_ops's norm measure.
void expect_grad(const std::string& what, const char* name, const DeviceBuffer& got, const Vec& want) {
  const FVec v = got.download();
  const double err = norm_error(v.data(), want.data(), want.size());
  MSSM_CHECK(err <= 1e-4, "%s %s: error %.3g vs the double backward (limit 1e-4)", what.c_str(), name, err);
}

void run(Rng& rng, const ScanTrainShape& s) {
  const ScanProblem p = make_scan_problem(rng, s);
  const train::ScanArgs& a = p.a;
  const int64_t BLD = s.batch * s.length * s.channels, BLGN = s.batch * s.length * s.groups * s.state;
  const int64_t boundary_n = (int64_t)p.boundary.size();
  const FVec &u = p.u, &delta = p.delta, &A = p.A, &B = p.B, &C = p.C, &D = p.D, &z = p.z, &bias = p.bias, &dy = p.dy;
  const FVec &dA0 = p.dA0, &dD0 = p.dD0, &db0 = p.db0;
  DeviceBuffer gu(u), gdelta(delta), gA(A), gB(B), gC(C), gD(D), gz(z), gbias(bias), gdy(dy);
  DeviceBuffer y(BLD), boundary(boundary_n), du(BLD), ddelta(BLD), dA(dA0), dB(BLGN), dC(BLGN), dD(dD0), dz(BLD),
      db(db0);
  for (DeviceBuffer* buffer : {&y, &boundary, &du, &ddelta, &dB, &dC, &dz}) buffer->poison();
  train::ScanTensors<float> t;
  t.u = gu.ptr, t.delta = gdelta.ptr, t.A = gA.ptr, t.B = gB.ptr, t.C = gC.ptr;
  t.D = s.has_D ? gD.ptr : nullptr;
  t.z = s.has_z ? gz.ptr : nullptr;
  t.delta_bias = s.has_bias ? gbias.ptr : nullptr;
  const std::string what = "scan_train " + describe(s);
  KERNEL_OK(cuda::scan_train_forward(a, t, y.ptr, boundary.ptr, nullptr));
  expect_gpu_close(what + " y", y.download(), to_float(p.y), 1e-5, rms(p.y.data(), BLD));
  expect_gpu_close(what + " boundary", boundary.download(), to_float(p.boundary), 1e-5,
                   rms(p.boundary.data(), boundary_n) + 1e-30);

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
  check_scan_gradients(p, du, ddelta, dA, dB, dC, dD, dz, db, grad);
}

void run_ssd(Rng& rng, const SsdTrainShape& s) {
  const SsdProblem p = make_ssd_problem(rng, s);
  const train::SsdTrainArgs& a = p.a;
  const int64_t BL = s.batch * s.length, H = s.heads, HP = s.heads * s.head_dim, GN = s.groups * s.state;
  const int64_t boundary_n = (int64_t)p.boundary.size();
  const FVec &x = p.x, &dt = p.dt, &A = p.A, &B = p.B, &C = p.C, &D = p.D, &bias = p.bias, &dy = p.dy;
  const FVec &dA0 = p.dA0, &dD0 = p.dD0, &db0 = p.db0;
  DeviceBuffer gx(x), gdt(dt), gA(A), gB(B), gC(C), gD(D), gbias(bias), gdy(dy);
  DeviceBuffer y(BL * HP), boundary(boundary_n), dx(BL * HP), ddt(BL * H), dA(dA0), dB(BL * GN), dC(BL * GN), dD(dD0),
      db(db0);
  for (DeviceBuffer* buffer : {&y, &boundary, &dx, &ddt, &dB, &dC}) buffer->poison();
  train::SsdTrainTensors<float> t;
  t.x = gx.ptr, t.dt = gdt.ptr, t.A = gA.ptr, t.B = gB.ptr, t.C = gC.ptr;
  t.D = s.has_D ? gD.ptr : nullptr;
  t.dt_bias = s.has_bias ? gbias.ptr : nullptr;
  const std::string what = "ssd_train " + describe(s);
  KERNEL_OK(cuda::ssd_train_forward(a, t, y.ptr, boundary.ptr, nullptr));
  expect_gpu_close(what + " y", y.download(), to_float(p.y), 1e-5, rms(p.y.data(), BL * HP));
  expect_gpu_close(what + " boundary", boundary.download(), to_float(p.boundary), 1e-5,
                   rms(p.boundary.data(), boundary_n) + 1e-30);
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
    for (DeviceBuffer* buffer : {&dx, &ddt, &dB, &dC}) buffer->poison();
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
    check_ssd_gradients(p, dx, ddt, dA, dB, dC, dD, db, grad);
  }
}

}  // namespace

int main() {
  const int code = device_or_exit_code("test_cuda_scan_train");
  if (code >= 0) return code;
  Rng rng(29);
  for (const ScanTrainShape& s : scan_train_shapes()) run(rng, s);
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
