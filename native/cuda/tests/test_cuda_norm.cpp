// The CUDA rmsnorm (plain, with residual, with residual_out, in place) and gated_rmsnorm (no gate,
// gate before or after the norm, in place, several groups) against the CPU kernels; dims 1 to 5000,
// not multiples of the 256-thread block. Outputs are poisoned with NaN first.
// Tolerance: 1e-5 relative against |want| + 1e-6·RMS(want) (the CPU test's floor: every element is
// one product of a value and a common scale, so only tiny elements need the floor).
#include <array>

#include "test_cuda_util.h"

using namespace mssm;
using namespace mssm::test;

int main() {
  const int code = device_or_exit_code("test_cuda_norm");
  if (code >= 0) return code;
  Rng rng(3);
  const auto& ref = reference_kernels();
  const float eps = 1e-5f;
  for (auto [rows, dim] : {std::array<int64_t, 2>{1, 1}, {3, 37}, {7, 768}, {2, 1536}, {1, 5000}}) {
    const int64_t n = rows * dim;
    auto x = rng.normals(n, 3), res = rng.normals(n), w = rng.uniforms(dim, 0.5f, 1.5f);
    for (int mode = 0; mode < 4; ++mode) {  // 0 plain, 1 residual, 2 residual + residual_out, 3 in place (out = x)
      const bool has_res = mode >= 1;
      std::vector<float> want(n), want_res(n);
      ref.rmsnorm(x.data(), has_res ? res.data() : nullptr, w.data(), want.data(), mode == 2 ? want_res.data() : nullptr,
                  rows, dim, eps);
      DeviceBuffer dx(x), dr(res), dw(w), out(n), rout(n);
      out.poison();
      rout.poison();
      float* o = mode == 3 ? dx.ptr : out.ptr;
      KERNEL_OK(cuda::rmsnorm(dx.ptr, has_res ? dr.ptr : nullptr, dw.ptr, o, mode == 2 ? rout.ptr : nullptr, rows, dim,
                              eps, nullptr));
      const std::string what = "rmsnorm rows" + std::to_string(rows) + " dim" + std::to_string(dim) + " mode" +
                               std::to_string(mode);
      expect_gpu_close(what, mode == 3 ? dx.download() : out.download(), want, 1e-5, 1e-6 * rms(want.data(), n));
      if (mode == 2) expect_gpu_close(what + " residual_out", rout.download(), want_res, 1e-6, 1e-30);
    }
  }
  for (auto [rows, dim, group] : {std::array<int64_t, 3>{1, 1, 1}, {3, 48, 16}, {2, 1536, 1536}, {4, 1536, 384},
                                  {2, 111, 37}}) {
    const int64_t n = rows * dim;
    auto x = rng.normals(n, 2), z = rng.normals(n, 2), w = rng.uniforms(dim, 0.5f, 1.5f);
    for (int mode = 0; mode < 5; ++mode) {  // 0 no z, 1 gate first, 2 norm first, 3 gate first out = x, 4 out = z
      const bool has_z = mode != 0, before = mode == 2;
      std::vector<float> want(n);
      ref.gated_rmsnorm(x.data(), has_z ? z.data() : nullptr, w.data(), want.data(), rows, dim, group, eps, before);
      DeviceBuffer dx(x), dz(z), dw(w), out(n);
      out.poison();
      float* o = mode == 3 ? dx.ptr : mode == 4 ? dz.ptr : out.ptr;
      KERNEL_OK(cuda::gated_rmsnorm(dx.ptr, has_z ? dz.ptr : nullptr, dw.ptr, o, rows, dim, group, eps, before, nullptr));
      const std::string what = "gated_rmsnorm rows" + std::to_string(rows) + " dim" + std::to_string(dim) + " group" +
                               std::to_string(group) + " mode" + std::to_string(mode);
      const auto got = mode == 3 ? dx.download() : mode == 4 ? dz.download() : out.download();
      expect_gpu_close(what, got, want, 1e-5, 1e-6 * rms(want.data(), n));
    }
  }
  MSSM_CHECK(!cuda::gated_rmsnorm(nullptr, nullptr, nullptr, nullptr, 1, 10, 3, eps, false, nullptr).ok(),
             "group_size not dividing dim must be an error");
  return finish("test_cuda_norm");
}
