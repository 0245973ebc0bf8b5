// The selective scan for training on the device, as block code on native/cuda/block.h's primitives so
// that it also compiles without nvcc (scan_train.cu launches it; native/tests/test_scan_train_blocks.cpp
// runs it on emulated blocks against the CPU trainer). The forward keeps the state at the start of
// every chunk; the backward recomputes the states of one chunk at a time from those (the paper's
// recomputation), walking the chunks last to first with the state's adjoint carried between them.
// The equations, layouts and gradient conventions are native/train/ops.h's (ScanArgs, ScanTensors,
// ScanGrads), for T = float.
//
// Mamba-2's SSD (native/train/ssd_chunked.h) is the same recurrence with each head's dt, A, D and
// dt_bias shared by its P channels (d = h·P + p) and A by the states, and no gate; the kernels run it
// in that layout (kSsd), with the per-head gradients summed over the head's channels. This is the
// recurrent form, token by token: the same values as the CPU trainer's chunked matrix form to float
// rounding. (ssd_train_backward takes the chunked form, ssd_backward_block.h, wherever its tiles fit.)
//
// One warp per (sequence b, channel d); lane l holds state indices n = l + 32·j, j < J (J = ⌈N/32⌉,
// N ≤ 256). Per token the warp sums over n with shuffles (y's Σ s·C; the backward's d dt and du).
// The sums over channels (dB, dC per (token, group, n)) and over sequences (dA, dD, d delta_bias)
// are atomic additions, so their float rounding order varies from run to run (not the CPU kernels'
// fixed order); the results agree to float rounding.
//
// dt follows native/train/dt_rule.h: v = Δ + bias, dt = softplus(v) (v itself above 20) when softplus,
// then clamped to [dt_min, dt_max] with gradient 0 where clamped.
#pragma once
#include <cstdint>
#include <type_traits>

#include "block.h"
#include "scalar.h"

namespace mssm::cuda::scan_train {

using scalar::train_step_rule;

constexpr int kWarpsPerBlock = 8;

struct ScanView {
  int64_t batch, length, channels, state, groups, chunk, chunks;
  bool softplus;
  float dt_min, dt_max;
  int64_t head_dim;  // the SSD layout: channels = heads · head_dim (unused by the plain scan)
};

// The plain scan's tensors, or the SSD's in the same roles: per-channel values (delta, A's row, D,
// delta_bias) then come from the channel's head, and the SSD has no z.
struct TrainTensors {
  const float *u, *delta, *A, *B, *C, *D, *z, *delta_bias;
};
struct TrainGrads {
  float *du, *ddelta, *dA, *dB, *dC, *dD, *dz, *ddelta_bias;
};

// Where channel d's per-channel values live: its own index (scan) or its head's (SSD).
template <bool kSsd>
struct Layout {
  int64_t D, P;
  MSSM_DEVICE_FN int64_t head(int64_t d) const { return kSsd ? d / P : d; }
  // delta / ddelta of token row (b·L + t): [rows, channels] or [rows, heads].
  MSSM_DEVICE_FN int64_t dt_at(int64_t row, int64_t d) const { return kSsd ? row * (D / P) + d / P : row * D + d; }
  // A of (d, n): [channels, state] or [heads].
  MSSM_DEVICE_FN int64_t a_at(int64_t d, int64_t n, int64_t N) const { return kSsd ? d / P : d * N + n; }
};

// dt and d dt / dv for v = Δ + bias (dt_rule.h).
MSSM_BLOCK_FN void step_rule(const ScanView& v, float x, float* dt, float* slope) {
  train_step_rule(v.softplus, v.dt_min, v.dt_max, x, dt, slope);
}


// One warp's (sequence b, channel d): its group, its row of A in the lanes (n = lane + 32·j; 0 past N),
// its delta bias and D, and the recurrence's step over the lane's state indices.
template <int J, bool kSsd>
struct Channel {
  int lane;
  int64_t b, d, g, D, N, G;
  Layout<kSsd> at;
  float A[J];
  float bias, Dd;

  MSSM_DEVICE_FN Channel(const ScanView& v, const TrainTensors& t, int64_t warp)
      : lane(block::lane_id()),
        b(warp / v.channels),
        d(warp % v.channels),
        g(d / (v.channels / v.groups)),
        D(v.channels),
        N(v.state),
        G(v.groups),
        at{v.channels, v.head_dim} {
#pragma unroll
    for (int j = 0; j < J; ++j) A[j] = lane + 32 * j < N ? t.A[at.a_at(d, lane + 32 * j, N)] : 0.0f;
    bias = t.delta_bias ? t.delta_bias[at.head(d)] : 0.0f;
    Dd = t.D ? t.D[at.head(d)] : 0.0f;
  }
  // Token i: its row (b·L + i), dt and d dt / dv, and u.
  MSSM_DEVICE_FN int64_t token(const ScanView& v, const TrainTensors& t, int64_t i, float* dt, float* slope,
                           float* u) const {
    const int64_t row = b * v.length + i;
    step_rule(v, t.delta[at.dt_at(row, d)] + bias, dt, slope);
    *u = t.u[row * D + d];
    return row;
  }
  // s ← exp(dt·A)·s + dt·u·B for the row's B.
  MSSM_DEVICE_FN void advance(const TrainTensors& t, int64_t row, float dt, float u, float* s) const {
    const float* Bt = t.B + (row * G + g) * N;
#pragma unroll
    for (int j = 0; j < J; ++j)
      if (lane + 32 * j < N) s[j] = expf(dt * A[j]) * s[j] + dt * u * Bt[lane + 32 * j];
  }
};

// Block block_index of the forward: warps (sequence, channel) block_index·kWarpsPerBlock + warp.
template <int J, bool kSsd>
MSSM_BLOCK_FN void scan_forward_block(ScanView v, TrainTensors t, float* y, float* boundary, int64_t block_index) {
  const int64_t warp = block_index * kWarpsPerBlock + block::warp_id();
  if (warp >= v.batch * v.channels) return;
  const Channel<J, kSsd> ch(v, t, warp);
  const int lane = ch.lane;
  const int64_t b = ch.b, d = ch.d, D = ch.D, N = ch.N;
  float s[J];
#pragma unroll
  for (int j = 0; j < J; ++j) s[j] = 0.0f;
  for (int64_t i = 0; i < v.length; ++i) {
    if (i % v.chunk == 0) {
      float* out = boundary + ((b * v.chunks + i / v.chunk) * D + d) * N;
#pragma unroll
      for (int j = 0; j < J; ++j)
        if (lane + 32 * j < N) out[lane + 32 * j] = s[j];
    }
    float dt, slope, u;
    const int64_t row = ch.token(v, t, i, &dt, &slope, &u);
    ch.advance(t, row, dt, u, s);
    const float* Ct = t.C + (row * ch.G + ch.g) * N;
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < J; ++j)
      if (lane + 32 * j < N) acc += s[j] * Ct[lane + 32 * j];
    const float yc = block::warp_sum(acc) + ch.Dd * u;
    if (lane == 0) y[row * D + d] = t.z ? yc * scalar::silu(t.z[row * D + d]) : yc;
  }
}

// Block block_index of the backward; states: the workspace (scan_train_backward_workspace_bytes).
template <int J, bool kSsd>
MSSM_BLOCK_FN void scan_backward_block(ScanView v, TrainTensors t, const float* boundary, const float* dy,
                                       TrainGrads gr, float* states, int64_t block_index) {
  const int64_t warp = block_index * kWarpsPerBlock + block::warp_id();
  if (warp >= v.batch * v.channels) return;
  const Channel<J, kSsd> ch(v, t, warp);
  const int lane = ch.lane;
  const int64_t b = ch.b, d = ch.d, D = ch.D, N = ch.N, g = ch.g, G = ch.G;
  const Layout<kSsd>& at = ch.at;
  const float* A = ch.A;
  const float Dd = ch.Dd;
  const int64_t Q = scalar::min64(v.chunk, v.length);
  float* S = states + warp * Q * N;  // this warp's recomputed states of one chunk, [q][n] after token q
  float ds[J], dA[J];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    ds[j] = 0.0f;
    dA[j] = 0.0f;
  }
  float dD = 0.0f, dbias = 0.0f;
  for (int64_t c = v.chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * v.chunk, t1 = scalar::min64(v.length, t0 + v.chunk);
    const float* start = boundary + ((b * v.chunks + c) * D + d) * N;
    // Recompute the chunk's states.
    float s[J];
#pragma unroll
    for (int j = 0; j < J; ++j) s[j] = lane + 32 * j < N ? start[lane + 32 * j] : 0.0f;
    for (int64_t i = t0; i < t1; ++i) {
      float dt, slope, u;
      const int64_t row = ch.token(v, t, i, &dt, &slope, &u);
      ch.advance(t, row, dt, u, s);
#pragma unroll
      for (int j = 0; j < J; ++j)
        if (lane + 32 * j < N) S[(i - t0) * N + lane + 32 * j] = s[j];
    }
    block::sync_warp();
    // Walk the chunk backwards; ds is the adjoint of s_i on entry to token i.
    for (int64_t i = t1 - 1; i >= t0; --i) {
      float dt, slope, u;
      const int64_t row = ch.token(v, t, i, &dt, &slope, &u), x_at = row * D + d;
      const float* Bt = t.B + (row * G + g) * N;
      const float* Ct = t.C + (row * G + g) * N;
      const float* si = S + (i - t0) * N;
      const float* sp = i > t0 ? S + (i - 1 - t0) * N : start;  // s_{i-1}
      float dyc = dy[x_at], dz = 0.0f;
      if (t.z) {
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < J; ++j)
          if (lane + 32 * j < N) acc += si[lane + 32 * j] * Ct[lane + 32 * j];
        const float yc = block::warp_sum(acc) + Dd * u;
        const float z = t.z[x_at], sg = 1.0f / (1.0f + expf(-z));
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
          MSSM_ATOMIC_ADD(gr.dC + bc, dyc * si[n]);
          const float a = expf(dt * A[j]), prev = sp[n];
          ddt += ds[j] * (A[j] * a * prev + u * Bt[n]);
          du += ds[j] * dt * Bt[n];
          dA[j] += ds[j] * dt * a * prev;
          MSSM_ATOMIC_ADD(gr.dB + bc, ds[j] * dt * u);
          ds[j] *= a;
        }
      }
      ddt = block::warp_sum(ddt);
      du = block::warp_sum(du);
      const float dv = ddt * slope;
      dbias += dv;
      if (lane == 0) {
        if (kSsd)
          MSSM_ATOMIC_ADD(gr.ddelta + at.dt_at(row, d), dv);  // Σ over the head's channels (zeroed first)
        else
          gr.ddelta[x_at] = dv;
        gr.du[x_at] = du + dyc * Dd;
        if (gr.dz) gr.dz[x_at] = dz;
      }
    }
    block::sync_warp();
  }
  if (kSsd) {
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < J; ++j) sum += dA[j];
    sum = block::warp_sum(sum);
    if (lane == 0) MSSM_ATOMIC_ADD(gr.dA + at.head(d), sum);
  } else {
#pragma unroll
    for (int j = 0; j < J; ++j)
      if (lane + 32 * j < N) MSSM_ATOMIC_ADD(gr.dA + d * N + lane + 32 * j, dA[j]);
  }
  if (lane == 0) {
    if (gr.dD) MSSM_ATOMIC_ADD(gr.dD + at.head(d), dD);
    if (gr.ddelta_bias) MSSM_ATOMIC_ADD(gr.ddelta_bias + at.head(d), dbias);
  }
}

// f(std::integral_constant<int, J>{}) for the register layout that holds `state` values a warp (J =
// ⌈N/32⌉ rounded up to a power of two; N ≤ 256).
template <typename F>
void with_layout(int64_t state, F f) {
  if (state <= 32)
    f(std::integral_constant<int, 1>{});
  else if (state <= 64)
    f(std::integral_constant<int, 2>{});
  else if (state <= 128)
    f(std::integral_constant<int, 4>{});
  else
    f(std::integral_constant<int, 8>{});
}

}  // namespace mssm::cuda::scan_train
