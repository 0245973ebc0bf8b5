// The selective scan for training on the device (cuda_kernels.h): the forward that keeps the state at
// the start of every chunk, and the backward that recomputes the states of one chunk at a time from
// those (the paper's recomputation), walking the chunks last to first with the state's adjoint
// carried between them. The equations, layouts and gradient conventions are native/train/ops.h's
// (ScanArgs, ScanTensors, ScanGrads), for T = float.
//
// One warp per (sequence b, channel d); lane l holds state indices n = l + 32·j, j < J (J = ⌈N/32⌉,
// N ≤ 256). Per token the warp sums over n with shuffles (y's Σ s·C; the backward's d dt and du).
// The sums over channels (dB, dC per (token, group, n)) and over sequences (dA, dD, d delta_bias)
// are atomic additions, so their float rounding order varies from run to run (not the CPU kernels'
// fixed order); the results agree to float rounding.
//
// dt follows native/train/dt_rule.h: v = Δ + bias, dt = softplus(v) (v itself above 20) when softplus,
// then clamped to [dt_min, dt_max] with gradient 0 where clamped.
#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace mssm::cuda {
namespace {

using detail::ceil_div;

constexpr int kWarpsPerBlock = 8;

struct ScanView {
  int64_t batch, length, channels, state, groups, chunk, chunks;
  bool softplus;
  float dt_min, dt_max;
};

// dt and d dt / dv for v = Δ + bias (dt_rule.h).
__device__ __forceinline__ void step_rule(const ScanView& v, float x, float* dt, float* slope) {
  float value = x, grad = 1.0f;
  if (v.softplus && x <= 20.0f) {
    value = log1pf(expf(x));
    grad = 1.0f / (1.0f + expf(-x));
  }
  const bool clamped = value < v.dt_min || value > v.dt_max;
  *dt = fminf(fmaxf(value, v.dt_min), v.dt_max);
  *slope = clamped ? 0.0f : grad;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <int J>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    scan_forward_kernel(ScanView v, train::ScanTensors<float> t, float* y, float* boundary) {
  const int64_t warp = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (warp >= v.batch * v.channels) return;
  const int lane = threadIdx.x % 32;
  const int64_t b = warp / v.channels, d = warp % v.channels, D = v.channels, N = v.state;
  const int64_t g = d / (D / v.groups), G = v.groups;
  float A[J], s[J];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t n = lane + 32 * j;
    A[j] = n < N ? t.A[d * N + n] : 0.0f;
    s[j] = 0.0f;
  }
  const float bias = t.delta_bias ? t.delta_bias[d] : 0.0f;
  const float Dd = t.D ? t.D[d] : 0.0f;
  for (int64_t i = 0; i < v.length; ++i) {
    const int64_t row = b * v.length + i;
    if (i % v.chunk == 0) {
      float* out = boundary + ((b * v.chunks + i / v.chunk) * D + d) * N;
#pragma unroll
      for (int j = 0; j < J; ++j)
        if (lane + 32 * j < N) out[lane + 32 * j] = s[j];
    }
    float dt, slope;
    step_rule(v, t.delta[row * D + d] + bias, &dt, &slope);
    const float u = t.u[row * D + d];
    const float* Bt = t.B + (row * G + g) * N;
    const float* Ct = t.C + (row * G + g) * N;
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int64_t n = lane + 32 * j;
      if (n < N) {
        s[j] = expf(dt * A[j]) * s[j] + dt * u * Bt[n];
        acc += s[j] * Ct[n];
      }
    }
    const float yc = warp_sum(acc) + Dd * u;
    if (lane == 0) y[row * D + d] = t.z ? yc * detail::silu(t.z[row * D + d]) : yc;
  }
}

template <int J>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    scan_backward_kernel(ScanView v, train::ScanTensors<float> t, const float* boundary, const float* dy,
                         train::ScanGrads<float> gr, float* states) {
  const int64_t warp = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (warp >= v.batch * v.channels) return;
  const int lane = threadIdx.x % 32;
  const int64_t b = warp / v.channels, d = warp % v.channels, D = v.channels, N = v.state;
  const int64_t g = d / (D / v.groups), G = v.groups;
  const int64_t Q = detail::min64(v.chunk, v.length);
  float* S = states + warp * Q * N;  // this warp's recomputed states of one chunk, [q][n] after token q
  float A[J], ds[J], dA[J];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t n = lane + 32 * j;
    A[j] = n < N ? t.A[d * N + n] : 0.0f;
    ds[j] = 0.0f;
    dA[j] = 0.0f;
  }
  const float bias = t.delta_bias ? t.delta_bias[d] : 0.0f;
  const float Dd = t.D ? t.D[d] : 0.0f;
  float dD = 0.0f, dbias = 0.0f;
  for (int64_t c = v.chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * v.chunk, t1 = detail::min64(v.length, t0 + v.chunk);
    const float* start = boundary + ((b * v.chunks + c) * D + d) * N;
    // Recompute the chunk's states.
    float s[J];
#pragma unroll
    for (int j = 0; j < J; ++j) s[j] = lane + 32 * j < N ? start[lane + 32 * j] : 0.0f;
    for (int64_t i = t0; i < t1; ++i) {
      const int64_t row = b * v.length + i;
      float dt, slope;
      step_rule(v, t.delta[row * D + d] + bias, &dt, &slope);
      const float u = t.u[row * D + d];
      const float* Bt = t.B + (row * G + g) * N;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int64_t n = lane + 32 * j;
        if (n < N) {
          s[j] = expf(dt * A[j]) * s[j] + dt * u * Bt[n];
          S[(i - t0) * N + n] = s[j];
        }
      }
    }
    __syncwarp();
    // Walk the chunk backwards; ds is the adjoint of s_i on entry to token i.
    for (int64_t i = t1 - 1; i >= t0; --i) {
      const int64_t row = b * v.length + i, at = row * D + d;
      float dt, slope;
      step_rule(v, t.delta[at] + bias, &dt, &slope);
      const float u = t.u[at];
      const float* Bt = t.B + (row * G + g) * N;
      const float* Ct = t.C + (row * G + g) * N;
      const float* si = S + (i - t0) * N;
      const float* sp = i > t0 ? S + (i - 1 - t0) * N : start;  // s_{i-1}
      float dyc = dy[at], dz = 0.0f;
      if (t.z) {
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < J; ++j)
          if (lane + 32 * j < N) acc += si[lane + 32 * j] * Ct[lane + 32 * j];
        const float yc = warp_sum(acc) + Dd * u;
        const float z = t.z[at], sg = 1.0f / (1.0f + expf(-z));
        dz = dyc * yc * sg * (1.0f + z * (1.0f - sg));
        dyc *= z * sg;
      }
      dD += dyc * u;
      float ddt = 0.0f, du = 0.0f;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int64_t n = lane + 32 * j;
        if (n < N) {
          const int64_t bc = (row * G + g) * N + n;
          ds[j] += dyc * Ct[n];
          atomicAdd(gr.dC + bc, dyc * si[n]);
          const float a = expf(dt * A[j]), prev = sp[n];
          ddt += ds[j] * (A[j] * a * prev + u * Bt[n]);
          du += ds[j] * dt * Bt[n];
          dA[j] += ds[j] * dt * a * prev;
          atomicAdd(gr.dB + bc, ds[j] * dt * u);
          ds[j] *= a;
        }
      }
      ddt = warp_sum(ddt);
      du = warp_sum(du);
      const float dv = ddt * slope;
      dbias += dv;
      if (lane == 0) {
        gr.ddelta[at] = dv;
        gr.du[at] = du + dyc * Dd;
        if (gr.dz) gr.dz[at] = dz;
      }
    }
    __syncwarp();
  }
#pragma unroll
  for (int j = 0; j < J; ++j)
    if (lane + 32 * j < N) atomicAdd(gr.dA + d * N + lane + 32 * j, dA[j]);
  if (lane == 0) {
    if (gr.dD) atomicAdd(gr.dD + d, dD);
    if (gr.ddelta_bias) atomicAdd(gr.ddelta_bias + d, dbias);
  }
}

Status check(const train::ScanArgs& a, const char* op, ScanView* v) {
  if (a.batch < 1 || a.length < 1 || a.channels < 1 || a.state < 1)
    return detail::error(op, "batch, length, channels and state must be at least 1");
  if (a.groups < 1 || a.channels % a.groups != 0)
    return detail::error(op, "groups " + std::to_string(a.groups) + " does not divide channels " +
                                 std::to_string(a.channels));
  if (a.chunk < 1) return detail::error(op, "chunk must be at least 1");
  if (a.state > 256) return detail::error(op, "state sizes above 256 are not supported on the device");
  *v = ScanView{a.batch, a.length, a.channels, a.state, a.groups, a.chunk, ceil_div(a.length, a.chunk), a.softplus,
                (float)a.dt_min, (float)a.dt_max};
  return {};
}

template <template <int> class Launch, typename... Args>
void by_state(int64_t state, Args&&... args) {
  if (state <= 32)
    Launch<1>::run(args...);
  else if (state <= 64)
    Launch<2>::run(args...);
  else if (state <= 128)
    Launch<4>::run(args...);
  else
    Launch<8>::run(args...);
}

template <int J>
struct LaunchForward {
  static void run(unsigned blocks, cudaStream_t stream, const ScanView& v, const train::ScanTensors<float>& t, float* y,
                  float* boundary) {
    scan_forward_kernel<J><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(v, t, y, boundary);
  }
};
template <int J>
struct LaunchBackward {
  static void run(unsigned blocks, cudaStream_t stream, const ScanView& v, const train::ScanTensors<float>& t,
                  const float* boundary, const float* dy, const train::ScanGrads<float>& g, float* states) {
    scan_backward_kernel<J><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(v, t, boundary, dy, g, states);
  }
};

}  // namespace

Status scan_train_forward(const train::ScanArgs& a, const train::ScanTensors<float>& t, float* y, float* boundary,
                          cudaStream_t stream) {
  const char* op = "scan_train_forward";
  ScanView v;
  MSSM_STATUS_TRY(check(a, op, &v));
  const unsigned blocks = (unsigned)ceil_div(a.batch * a.channels, kWarpsPerBlock);
  by_state<LaunchForward>(a.state, blocks, stream, v, t, y, boundary);
  return detail::check_launch(op);
}

size_t scan_train_backward_workspace_bytes(const train::ScanArgs& a) {
  return (size_t)(a.batch * a.channels * std::min(a.chunk, a.length) * a.state) * sizeof(float);
}

Status scan_train_backward(const train::ScanArgs& a, const train::ScanTensors<float>& t, const float* boundary,
                           const float* dy, const train::ScanGrads<float>& g, void* workspace, cudaStream_t stream) {
  const char* op = "scan_train_backward";
  ScanView v;
  MSSM_STATUS_TRY(check(a, op, &v));
  if (!g.du || !g.ddelta || !g.dA || !g.dB || !g.dC) return detail::error(op, "du, ddelta, dA, dB and dC are required");
  if ((g.dD == nullptr) != (t.D == nullptr) || (g.dz == nullptr) != (t.z == nullptr) ||
      (g.ddelta_bias == nullptr) != (t.delta_bias == nullptr))
    return detail::error(op, "dD, dz and ddelta_bias must be given exactly when D, z and delta_bias are");
  if (!workspace) return detail::error(op, "a workspace of scan_train_backward_workspace_bytes() is required");
  // dB and dC are outputs (=) made of atomic sums over channels: zero them first.
  const size_t bc_bytes = (size_t)(a.batch * a.length * a.groups * a.state) * sizeof(float);
  MSSM_CUDA_TRY(op, cudaMemsetAsync(g.dB, 0, bc_bytes, stream));
  MSSM_CUDA_TRY(op, cudaMemsetAsync(g.dC, 0, bc_bytes, stream));
  const unsigned blocks = (unsigned)ceil_div(a.batch * a.channels, kWarpsPerBlock);
  by_state<LaunchBackward>(a.state, blocks, stream, v, t, boundary, dy, g, static_cast<float*>(workspace));
  return detail::check_launch(op);
}

}  // namespace mssm::cuda
