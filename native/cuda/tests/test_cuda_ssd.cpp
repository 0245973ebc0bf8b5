// The CUDA chunked SSD (fp32 and bf16 tensor-core paths) and ssd_step against the CPU kernels
// (baseline level, held to 1e-5 of a float64 reference by test_ssd), on awkward sizes: length 1,
// lengths that are not multiples of the GPU chunk (64 tokens, 32 when N·P is large), head_dim and
// state not multiples of 16, several groups, batch > 1, N up to 256, dt clamped or not. Outputs are
// poisoned with NaN first and must all be written. ssd_step repeated equals one chunked call.
//
// Tolerances, against |want| + floor with floor = RMS(want) (so near-zero elements may be off by
// tolerance·RMS absolute): fp32 path 1e-5 relative; bf16 tensor-core path 1e-2 relative (operands
// rounded to 8 bits of mantissa, fp32 accumulation).
#include <array>
#include <cstring>

#include "test_cuda_util.h"

using namespace mssm;
using namespace mssm::test;

namespace {

struct Case {
  int64_t batch, length, heads, head_dim, state, groups;
  bool has_D, has_z, has_bias, clamp, has_state_in;
  std::vector<float> x, dt, A, B, C, D, z, bias, s_in;
};

Case make_case(Rng& rng, int64_t batch, int64_t length, int64_t H, int64_t P, int64_t N, int64_t G, unsigned o) {
  Case c{batch, length, H, P, N, G, (o & 1) != 0, (o & 2) != 0, (o & 4) != 0, (o & 8) != 0, (o & 16) != 0};
  const size_t tokens = batch * length;
  c.x = rng.normals(tokens * H * P);
  c.dt = rng.uniforms(tokens * H, -4, 1);  // before softplus: dt' from 0.02 to 1.3
  c.bias = rng.uniforms(H, -1, 1);
  c.A.resize(H);
  for (auto& a : c.A) a = -std::exp(rng.uniform(-2, 1.5f));
  c.B = rng.normals(tokens * G * N);
  c.C = rng.normals(tokens * G * N);
  c.D = rng.normals(H);
  c.z = rng.normals(tokens * H * P, 2);
  c.s_in = rng.normals(batch * H * P * N);
  return c;
}

cpu::SsdArgs host_args(const Case& c) {
  cpu::SsdArgs a;
  a.batch = c.batch, a.length = c.length, a.heads = c.heads, a.head_dim = c.head_dim, a.state = c.state;
  a.groups = c.groups, a.chunk_size = 64;
  a.x = c.x.data(), a.dt = c.dt.data(), a.A = c.A.data(), a.B = c.B.data(), a.C = c.C.data();
  a.D = c.has_D ? c.D.data() : nullptr;
  a.z = c.has_z ? c.z.data() : nullptr;
  a.dt_bias = c.has_bias ? c.bias.data() : nullptr;
  a.dt_softplus = true;
  if (c.clamp) a.dt_min = 0.05f, a.dt_max = 0.8f;
  return a;
}

struct DeviceCase {
  DeviceBuffer x, dt, A, B, C, D, z, bias;
  explicit DeviceCase(const Case& c) : x(c.x), dt(c.dt), A(c.A), B(c.B), C(c.C), D(c.D), z(c.z), bias(c.bias) {}
  cpu::SsdArgs args(const Case& c) const {
    cpu::SsdArgs a = host_args(c);
    a.x = x.ptr, a.dt = dt.ptr, a.A = A.ptr, a.B = B.ptr, a.C = C.ptr;
    a.D = c.has_D ? D.ptr : nullptr;
    a.z = c.has_z ? z.ptr : nullptr;
    a.dt_bias = c.has_bias ? bias.ptr : nullptr;
    return a;
  }
};

std::string describe(const Case& c) {
  char text[200];
  std::snprintf(text, sizeof text, "b%lld L%lld H%lld P%lld N%lld G%lld D%d z%d bias%d clamp%d in%d",
                (long long)c.batch, (long long)c.length, (long long)c.heads, (long long)c.head_dim, (long long)c.state,
                (long long)c.groups, c.has_D, c.has_z, c.has_bias, c.clamp, c.has_state_in);
  return text;
}

void test_chunked(const Case& c) {
  std::vector<float> y_ref(c.batch * c.length * c.heads * c.head_dim), s_ref(c.s_in.size());
  cpu::SsdArgs h = host_args(c);
  h.state_in = c.has_state_in ? c.s_in.data() : nullptr;
  h.state_out = s_ref.data(), h.y = y_ref.data();
  reference_kernels().ssd_chunked(h);
  const double y_floor = rms(y_ref.data(), y_ref.size()), s_floor = rms(s_ref.data(), s_ref.size());

  DeviceCase dev(c);
  for (cuda::SsdMath math : {cuda::SsdMath::fp32, cuda::SsdMath::bf16_tensor}) {
    const double tol = math == cuda::SsdMath::fp32 ? 1e-5 : 1e-2;
    const std::string what = describe(c) + (math == cuda::SsdMath::fp32 ? " fp32" : " bf16");
    // Twice: with the caller's workspace (state_out aliasing state_in), and with an internal one
    // (separate state_out).
    for (int variant = 0; variant < 2; ++variant) {
      DeviceBuffer y(y_ref.size()), state(c.s_in), out(c.s_in.size());
      y.poison();
      out.poison();
      cpu::SsdArgs a = dev.args(c);
      a.state_in = c.has_state_in ? state.ptr : nullptr;
      a.state_out = variant == 0 ? state.ptr : out.ptr;
      if (variant == 0 && !c.has_state_in) state.poison();
      a.y = y.ptr;
      void* work = nullptr;
      if (variant == 0) CUDA_OK(cudaMalloc(&work, cuda::ssd_chunked_workspace_bytes(a)));
      KERNEL_OK(cuda::ssd_chunked(a, math, work, nullptr));
      if (work) CUDA_OK(cudaFree(work));
      expect_gpu_close(what + " y", y.download(), y_ref, tol, y_floor);
      expect_gpu_close(what + " state", variant == 0 ? state.download() : out.download(), s_ref, tol, s_floor);
    }
  }
}

std::vector<float> token(const std::vector<float>& v, int64_t batch, int64_t length, int64_t width, int64_t t) {
  std::vector<float> out(batch * width);
  for (int64_t b = 0; b < batch; ++b)
    std::memcpy(&out[b * width], &v[(b * length + t) * width], width * sizeof(float));
  return out;
}

void test_steps(const Case& c) {
  DeviceCase dev(c);
  const int64_t HP = c.heads * c.head_dim, GN = c.groups * c.state;
  DeviceBuffer y(c.batch * c.length * HP), s_seq(c.s_in.size()), state(c.s_in);
  cpu::SsdArgs a = dev.args(c);
  a.state_in = state.ptr, a.state_out = s_seq.ptr, a.y = y.ptr;
  KERNEL_OK(cuda::ssd_chunked(a, cuda::SsdMath::fp32, nullptr, nullptr));
  const std::vector<float> y_seq = y.download(), s_want = s_seq.download();
  std::vector<float> y_step(y_seq.size());
  for (int64_t t = 0; t < c.length; ++t) {
    DeviceBuffer x(token(c.x, c.batch, c.length, HP, t)), dt(token(c.dt, c.batch, c.length, c.heads, t)),
        z(token(c.z, c.batch, c.length, HP, t)), B(token(c.B, c.batch, c.length, GN, t)),
        C(token(c.C, c.batch, c.length, GN, t)), yt(c.batch * HP);
    yt.poison();
    cpu::SsdArgs s = dev.args(c);
    s.length = 1, s.x = x.ptr, s.dt = dt.ptr, s.B = B.ptr, s.C = C.ptr;
    s.z = c.has_z ? z.ptr : nullptr;
    s.state_in = state.ptr, s.state_out = state.ptr, s.y = yt.ptr;
    KERNEL_OK(cuda::ssd_step(s, nullptr));
    const std::vector<float> got = yt.download();
    for (int64_t b = 0; b < c.batch; ++b) std::memcpy(&y_step[(b * c.length + t) * HP], &got[b * HP], HP * 4);
  }
  const std::string what = describe(c) + " steps";
  expect_gpu_close(what + " y", y_step, y_seq, 1e-5, rms(y_seq.data(), y_seq.size()));
  expect_gpu_close(what + " state", state.download(), s_want, 1e-5, rms(s_want.data(), s_want.size()));
}

}  // namespace

int main() {
  const int code = device_or_exit_code("test_cuda_ssd");
  if (code >= 0) return code;
  Rng rng(23);
  // (batch, length, heads, head_dim, state, groups)
  const std::array<int64_t, 6> shapes[] = {{1, 1, 2, 8, 16, 1},    {2, 100, 4, 24, 16, 2}, {1, 200, 3, 37, 33, 1},
                                           {2, 130, 8, 64, 128, 2}, {1, 70, 2, 64, 256, 1}, {3, 64, 6, 16, 64, 3},
                                           {1, 65, 1, 5, 7, 1},     {2, 300, 4, 32, 128, 1}};
  unsigned options = 0;
  for (auto& s : shapes)
    for (int rep = 0; rep < 2; ++rep) {
      options = (options + 13) % 32;
      test_chunked(make_case(rng, s[0], s[1], s[2], s[3], s[4], s[5], options));
    }
  test_steps(make_case(rng, 2, 70, 4, 24, 16, 2, 31));
  test_steps(make_case(rng, 1, 20, 2, 64, 128, 1, 31));
  cpu::SsdArgs bad;
  bad.heads = 6, bad.groups = 4, bad.head_dim = 4, bad.state = 4;
  MSSM_CHECK(!cuda::ssd_chunked(bad, cuda::SsdMath::fp32, nullptr, nullptr).ok(), "heads %% groups != 0 must be an error");
  return finish("test_cuda_ssd");
}
