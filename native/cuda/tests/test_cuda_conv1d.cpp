// The CUDA causal conv1d and conv1d_step against the CPU kernels, on awkward sizes (length 1, length
// shorter than the K-1 state rows, channels not multiples of 32, batch > 1, K = 1), with and without
// bias, SiLU and a state (separate or aliased). Outputs are poisoned with NaN first. Steps repeated
// equal one sequence call.
// Tolerance: y within 1e-5 relative against |want| + 0.1·RMS(want) (a K-term dot product and a SiLU);
// states are copies and must match exactly.
#include <array>
#include <cstring>

#include "test_cuda_util.h"

using namespace mssm;
using namespace mssm::test;

int main() {
  const int code = device_or_exit_code("test_cuda_conv1d");
  if (code >= 0) return code;
  Rng rng(5);
  const auto& ref = reference_kernels();
  // (batch, length, channels, kernel)
  const std::array<int64_t, 4> shapes[] = {{1, 1, 5, 4}, {2, 7, 37, 4}, {3, 100, 70, 3}, {2, 2, 33, 4},
                                           {1, 50, 64, 1}, {4, 1, 1536, 4}, {2, 3, 40, 5}};
  int variant = 0;
  for (auto& s : shapes) {
    const int64_t batch = s[0], L = s[1], C = s[2], K = s[3], hist = K - 1;
    for (int rep = 0; rep < 4; ++rep, ++variant) {
      const bool has_bias = variant % 2 == 0, silu = variant % 3 != 0, has_state = variant % 4 != 1;
      const bool aliased = variant % 5 < 2;
      auto x = rng.normals(batch * L * C), w = rng.normals(C * K, 0.5f), bias = rng.normals(C);
      auto s_in = rng.normals(batch * hist * C);
      std::vector<float> y_ref(batch * L * C), s_ref(batch * hist * C);
      ref.conv1d(x.data(), w.data(), has_bias ? bias.data() : nullptr, has_state ? s_in.data() : nullptr, s_ref.data(),
                 y_ref.data(), batch, L, C, K, silu);
      DeviceBuffer dx(x), dw(w), db(bias), state(s_in), out(s_in.size()), y(y_ref.size());
      y.poison();
      out.poison();
      if (aliased && !has_state) state.poison();
      float* s_out = aliased ? state.ptr : out.ptr;
      KERNEL_OK(cuda::conv1d(dx.ptr, dw.ptr, has_bias ? db.ptr : nullptr, has_state ? state.ptr : nullptr, s_out, y.ptr,
                             batch, L, C, K, silu, nullptr));
      char what[120];
      std::snprintf(what, sizeof what, "conv1d b%lld L%lld C%lld K%lld bias%d silu%d state%d alias%d", (long long)batch,
                    (long long)L, (long long)C, (long long)K, has_bias, silu, has_state, aliased);
      expect_gpu_close(std::string(what) + " y", y.download(), y_ref, 1e-5, 0.1 * rms(y_ref.data(), y_ref.size()));
      if (hist > 0)
        expect_gpu_close(std::string(what) + " state", aliased ? state.download() : out.download(), s_ref, 0.0, 1e-30);

      // Steps from the same start state, in place.
      if (!has_state) continue;
      state.upload(s_in);
      std::vector<float> y_step(y_ref.size());
      for (int64_t t = 0; t < L; ++t) {
        std::vector<float> xt(batch * C);
        for (int64_t b = 0; b < batch; ++b) std::memcpy(&xt[b * C], &x[(b * L + t) * C], C * 4);
        DeviceBuffer dxt(xt), yt(batch * C);
        yt.poison();
        KERNEL_OK(cuda::conv1d_step(dxt.ptr, dw.ptr, has_bias ? db.ptr : nullptr, state.ptr, yt.ptr, batch, C, K, silu,
                                    nullptr));
        const auto got = yt.download();
        for (int64_t b = 0; b < batch; ++b) std::memcpy(&y_step[(b * L + t) * C], &got[b * C], C * 4);
      }
      expect_gpu_close(std::string(what) + " steps y", y_step, y_ref, 1e-5, 0.1 * rms(y_ref.data(), y_ref.size()));
      if (hist > 0) expect_gpu_close(std::string(what) + " steps state", state.download(), s_ref, 0.0, 1e-30);
    }
  }
  return finish("test_cuda_conv1d");
}
