// The CUDA selective scan and selective_state_update against the CPU kernels (baseline level, which
// test_selective_scan holds to 1e-5 of a float64 reference), on awkward sizes: length 1, lengths that
// are not multiples of the 256-token chunk, channels not multiples of the 8-channel tile or of 32,
// several groups, batch > 1, N not a multiple of the 8-index B/C slice, and N = 128 (shared memory
// over 48 KB). Outputs are poisoned with NaN before each run and must all be written.
// Token-by-token updates on the GPU must equal one GPU sequence call.
//
// Tolerance: 1e-5 relative, against |want| + floor with floor = RMS(want): elements that cancel to
// near zero may be off by 1e-5·RMS absolute (the CPU test's bound; the recurrence itself rounds to
// a few 1e-6·RMS in fp32).
#include <array>
#include <cstring>

#include "test_cuda_util.h"

using namespace mssm;
using namespace mssm::test;

namespace {

constexpr double kRel = 1e-5;

struct Case {
  int64_t batch, length, channels, state, groups;
  bool has_D, has_z, has_bias, softplus, has_state_in;
  int state_out;  // 0 none, 1 separate, 2 aliased with state_in
  std::vector<float> u, delta, A, B, C, D, z, bias, s_in;
};

Case make_case(Rng& rng, int64_t batch, int64_t length, int64_t channels, int64_t state, int64_t groups, unsigned o) {
  Case c{batch, length, channels, state, groups, (o & 1) != 0, (o & 2) != 0, (o & 4) != 0, (o & 8) != 0,
         (o & 16) != 0, (int)(o / 32 % 3)};
  const size_t tokens = batch * length;
  c.u = rng.normals(tokens * channels);
  c.delta = c.softplus ? rng.uniforms(tokens * channels, -4, 1) : rng.uniforms(tokens * channels, 0.02f, 1.3f);
  c.bias = c.softplus ? rng.uniforms(channels, -1, 1) : rng.uniforms(channels, 0, 0.1f);
  c.A.resize(channels * state);
  for (auto& a : c.A) a = -std::exp(rng.uniform(-2, 2));
  c.B = rng.normals(tokens * groups * state);
  c.C = rng.normals(tokens * groups * state);
  c.D = rng.normals(channels);
  c.z = rng.normals(tokens * channels, 2);
  c.s_in = rng.normals(batch * channels * state);
  return c;
}

cpu::SelectiveScanArgs host_args(const Case& c) {
  cpu::SelectiveScanArgs a;
  a.batch = c.batch, a.length = c.length, a.channels = c.channels, a.state = c.state, a.groups = c.groups;
  a.u = c.u.data(), a.delta = c.delta.data(), a.A = c.A.data(), a.B = c.B.data(), a.C = c.C.data();
  a.D = c.has_D ? c.D.data() : nullptr;
  a.z = c.has_z ? c.z.data() : nullptr;
  a.delta_bias = c.has_bias ? c.bias.data() : nullptr;
  a.delta_softplus = c.softplus;
  return a;
}

// The inputs on the device.
struct DeviceCase {
  DeviceBuffer u, delta, A, B, C, D, z, bias;
  explicit DeviceCase(const Case& c)
      : u(c.u), delta(c.delta), A(c.A), B(c.B), C(c.C), D(c.D), z(c.z), bias(c.bias) {}
  cpu::SelectiveScanArgs args(const Case& c) const {
    cpu::SelectiveScanArgs a = host_args(c);
    a.u = u.ptr, a.delta = delta.ptr, a.A = A.ptr, a.B = B.ptr, a.C = C.ptr;
    a.D = c.has_D ? D.ptr : nullptr;
    a.z = c.has_z ? z.ptr : nullptr;
    a.delta_bias = c.has_bias ? bias.ptr : nullptr;
    return a;
  }
};

std::string describe(const Case& c) {
  char text[200];
  std::snprintf(text, sizeof text, "b%lld L%lld D%lld N%lld G%lld D%d z%d bias%d sp%d in%d out%d", (long long)c.batch,
                (long long)c.length, (long long)c.channels, (long long)c.state, (long long)c.groups, c.has_D, c.has_z,
                c.has_bias, c.softplus, c.has_state_in, c.state_out);
  return text;
}

void test_sequence(const Case& c) {
  // CPU reference
  std::vector<float> y_ref(c.batch * c.length * c.channels), s_ref(c.s_in.size());
  cpu::SelectiveScanArgs h = host_args(c);
  h.state_in = c.has_state_in ? c.s_in.data() : nullptr;
  h.state_out = s_ref.data();
  h.y = y_ref.data();
  reference_kernels().selective_scan(h);

  DeviceCase dev(c);
  DeviceBuffer y(y_ref.size()), state(c.s_in), out(c.s_in.size());
  y.poison();
  out.poison();
  cpu::SelectiveScanArgs a = dev.args(c);
  a.state_in = c.has_state_in ? state.ptr : nullptr;
  a.state_out = c.state_out == 0 ? nullptr : c.state_out == 1 ? out.ptr : state.ptr;
  if (c.state_out == 2 && !c.has_state_in) state.poison();  // aliased but not read: must be written
  a.y = y.ptr;
  KERNEL_OK(cuda::selective_scan(a, nullptr));
  const std::string what = describe(c);
  expect_gpu_close(what + " y", y.download(), y_ref, kRel, rms(y_ref.data(), y_ref.size()));
  if (a.state_out) {
    std::vector<float> got = c.state_out == 1 ? out.download() : state.download();
    expect_gpu_close(what + " state", got, s_ref, kRel, rms(s_ref.data(), s_ref.size()));
  }
}

// [batch, length, width] -> token t as [batch, width]
std::vector<float> token(const std::vector<float>& v, int64_t batch, int64_t length, int64_t width, int64_t t) {
  std::vector<float> out(batch * width);
  for (int64_t b = 0; b < batch; ++b)
    std::memcpy(&out[b * width], &v[(b * length + t) * width], width * sizeof(float));
  return out;
}

void test_steps(const Case& c) {
  DeviceCase dev(c);
  DeviceBuffer y(c.batch * c.length * c.channels), s_seq(c.s_in.size()), state(c.s_in);
  cpu::SelectiveScanArgs a = dev.args(c);
  a.state_in = state.ptr, a.state_out = s_seq.ptr, a.y = y.ptr;
  y.poison();
  KERNEL_OK(cuda::selective_scan(a, nullptr));
  const std::vector<float> y_seq = y.download(), s_want = s_seq.download();

  const int64_t Dn = c.channels, GN = c.groups * c.state;
  std::vector<float> y_step(y_seq.size());
  for (int64_t t = 0; t < c.length; ++t) {
    DeviceBuffer u(token(c.u, c.batch, c.length, Dn, t)), delta(token(c.delta, c.batch, c.length, Dn, t)),
        z(token(c.z, c.batch, c.length, Dn, t)), B(token(c.B, c.batch, c.length, GN, t)),
        C(token(c.C, c.batch, c.length, GN, t)), yt(c.batch * Dn);
    yt.poison();
    cpu::SelectiveScanArgs s = dev.args(c);
    s.length = 1, s.u = u.ptr, s.delta = delta.ptr, s.B = B.ptr, s.C = C.ptr;
    s.z = c.has_z ? z.ptr : nullptr;
    s.state_in = state.ptr, s.state_out = state.ptr, s.y = yt.ptr;
    KERNEL_OK(cuda::selective_state_update(s, nullptr));
    const std::vector<float> got = yt.download();
    for (int64_t b = 0; b < c.batch; ++b) std::memcpy(&y_step[(b * c.length + t) * Dn], &got[b * Dn], Dn * 4);
  }
  const std::string what = describe(c) + " steps";
  expect_gpu_close(what + " y", y_step, y_seq, kRel, rms(y_seq.data(), y_seq.size()));
  expect_gpu_close(what + " state", state.download(), s_want, kRel, rms(s_want.data(), s_want.size()));
}

}  // namespace

int main() {
  const int code = device_or_exit_code("test_cuda_selective_scan");
  if (code >= 0) return code;
  Rng rng(11);
  // (batch, length, channels, state, groups)
  const int64_t shapes[][5] = {{1, 1, 5, 16, 1},    {2, 7, 37, 16, 1},   {3, 300, 40, 16, 2}, {1, 600, 24, 33, 3},
                               {1, 257, 13, 64, 1}, {2, 100, 8, 128, 2}, {2, 33, 42, 1, 3},   {1, 513, 70, 7, 2},
                               {4, 256, 1, 5, 1},   {2, 1, 48, 16, 3},   {1, 1000, 96, 16, 1}};
  unsigned options = 0;
  for (auto& s : shapes)
    for (int rep = 0; rep < 3; ++rep) {
      options = (options + 37) % 96;  // walks through the combinations of D, z, bias, softplus, state in/out
      test_sequence(make_case(rng, s[0], s[1], s[2], s[3], s[4], options));
    }
  // Every option on, sequence vs steps.
  for (auto& s : {std::array<int64_t, 5>{3, 20, 37, 16, 1}, std::array<int64_t, 5>{2, 9, 24, 33, 3}})
    test_steps(make_case(rng, s[0], s[1], s[2], s[3], s[4], 31 + 64));
  // A bad argument is reported, not crashed on.
  cpu::SelectiveScanArgs bad;
  bad.channels = 10, bad.groups = 3, bad.state = 4;
  MSSM_CHECK(!cuda::selective_scan(bad, nullptr).ok(), "channels %% groups != 0 must be an error");
  return finish("test_cuda_selective_scan");
}
