// The selective scan for training on the device (cuda_kernels.h): the forward that keeps the state at
// the start of every chunk, and the backward that recomputes the states of one chunk at a time from
// those (the paper's recomputation), walking the chunks last to first with the state's adjoint
// carried between them. The equations, layouts and gradient conventions are native/train/ops.h's
// (ScanArgs, ScanTensors, ScanGrads), for T = float.
//
// Mamba-2's SSD (native/train/ssd_chunked.h) is the same recurrence with each head's dt, A, D and
// dt_bias shared by its P channels (d = h·P + p) and A by the states, and no gate; the kernels run it
// in that layout (kSsd), with the per-head gradients summed over the head's channels. This is the
// recurrent form, token by token: the same values as the CPU trainer's chunked matrix form to float
// rounding. ssd_train_backward takes the chunked form (ssd_train.cu) wherever its tiles fit.
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
#include "ssd_backward_block.h"

namespace mssm::cuda {
namespace {

using detail::ceil_div;

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
  __device__ int64_t head(int64_t d) const { return kSsd ? d / P : d; }
  // delta / ddelta of token row (b·L + t): [rows, channels] or [rows, heads].
  __device__ int64_t dt_at(int64_t row, int64_t d) const { return kSsd ? row * (D / P) + d / P : row * D + d; }
  // A of (d, n): [channels, state] or [heads].
  __device__ int64_t a_at(int64_t d, int64_t n, int64_t N) const { return kSsd ? d / P : d * N + n; }
};

// dt and d dt / dv for v = Δ + bias (dt_rule.h).
__device__ __forceinline__ void step_rule(const ScanView& v, float x, float* dt, float* slope) {
  ssd_backward::train_step_rule(v.softplus, v.dt_min, v.dt_max, x, dt, slope);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
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

  __device__ Channel(const ScanView& v, const TrainTensors& t, int64_t warp)
      : lane(threadIdx.x % 32),
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
  __device__ int64_t token(const ScanView& v, const TrainTensors& t, int64_t i, float* dt, float* slope,
                           float* u) const {
    const int64_t row = b * v.length + i;
    step_rule(v, t.delta[at.dt_at(row, d)] + bias, dt, slope);
    *u = t.u[row * D + d];
    return row;
  }
  // s ← exp(dt·A)·s + dt·u·B for the row's B.
  __device__ void advance(const TrainTensors& t, int64_t row, float dt, float u, float* s) const {
    const float* Bt = t.B + (row * G + g) * N;
#pragma unroll
    for (int j = 0; j < J; ++j)
      if (lane + 32 * j < N) s[j] = expf(dt * A[j]) * s[j] + dt * u * Bt[lane + 32 * j];
  }
};

template <int J, bool kSsd>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    scan_forward_kernel(ScanView v, TrainTensors t, float* y, float* boundary) {
  const int64_t warp = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
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
    const float yc = warp_sum(acc) + ch.Dd * u;
    if (lane == 0) y[row * D + d] = t.z ? yc * detail::silu(t.z[row * D + d]) : yc;
  }
}

template <int J, bool kSsd>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    scan_backward_kernel(ScanView v, TrainTensors t, const float* boundary, const float* dy, TrainGrads gr,
                         float* states) {
  const int64_t warp = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (warp >= v.batch * v.channels) return;
  const Channel<J, kSsd> ch(v, t, warp);
  const int lane = ch.lane;
  const int64_t b = ch.b, d = ch.d, D = ch.D, N = ch.N, g = ch.g, G = ch.G;
  const Layout<kSsd>& at = ch.at;
  const float* A = ch.A;
  const float Dd = ch.Dd;
  const int64_t Q = detail::min64(v.chunk, v.length);
  float* S = states + warp * Q * N;  // this warp's recomputed states of one chunk, [q][n] after token q
  float ds[J], dA[J];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    ds[j] = 0.0f;
    dA[j] = 0.0f;
  }
  float dD = 0.0f, dbias = 0.0f;
  for (int64_t c = v.chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * v.chunk, t1 = detail::min64(v.length, t0 + v.chunk);
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
    __syncwarp();
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
        const float yc = warp_sum(acc) + Dd * u;
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
        if (kSsd)
          atomicAdd(gr.ddelta + at.dt_at(row, d), dv);  // Σ over the head's channels (zeroed first)
        else
          gr.ddelta[x_at] = dv;
        gr.du[x_at] = du + dyc * Dd;
        if (gr.dz) gr.dz[x_at] = dz;
      }
    }
    __syncwarp();
  }
  if (kSsd) {
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < J; ++j) sum += dA[j];
    sum = warp_sum(sum);
    if (lane == 0) atomicAdd(gr.dA + at.head(d), sum);
  } else {
#pragma unroll
    for (int j = 0; j < J; ++j)
      if (lane + 32 * j < N) atomicAdd(gr.dA + d * N + lane + 32 * j, dA[j]);
  }
  if (lane == 0) {
    if (gr.dD) atomicAdd(gr.dD + at.head(d), dD);
    if (gr.ddelta_bias) atomicAdd(gr.ddelta_bias + at.head(d), dbias);
  }
}

Status check(const train::ScanArgs& a, int64_t head_dim, const char* op, ScanView* v) {
  if (a.batch < 1 || a.length < 1 || a.channels < 1 || a.state < 1)
    return detail::error(op, "batch, length, channels and state must be at least 1");
  const int64_t units = head_dim ? a.channels / head_dim : a.channels;  // what the groups split: heads or channels
  if (a.groups < 1 || units % a.groups != 0)
    return detail::error(op, "groups " + std::to_string(a.groups) + " does not divide " +
                                 (head_dim ? "heads " : "channels ") + std::to_string(units));
  if (a.chunk < 1) return detail::error(op, "chunk must be at least 1");
  if (a.state > 256) return detail::error(op, "state sizes above 256 are not supported on the device");
  *v = ScanView{a.batch, a.length, a.channels, a.state, a.groups, a.chunk, ceil_div(a.length, a.chunk),
                a.softplus, (float)a.dt_min, (float)a.dt_max, head_dim};
  return {};
}

// Launches the kernel for the register layout that holds `state` values per warp (J = ⌈N/32⌉ rounded
// up to a power of two).
template <bool kSsd>
void launch_forward(const ScanView& v, const TrainTensors& t, float* y, float* boundary, cudaStream_t stream) {
  const unsigned blocks = (unsigned)ceil_div(v.batch * v.channels, kWarpsPerBlock), threads = 32 * kWarpsPerBlock;
  if (v.state <= 32)
    scan_forward_kernel<1, kSsd><<<blocks, threads, 0, stream>>>(v, t, y, boundary);
  else if (v.state <= 64)
    scan_forward_kernel<2, kSsd><<<blocks, threads, 0, stream>>>(v, t, y, boundary);
  else if (v.state <= 128)
    scan_forward_kernel<4, kSsd><<<blocks, threads, 0, stream>>>(v, t, y, boundary);
  else
    scan_forward_kernel<8, kSsd><<<blocks, threads, 0, stream>>>(v, t, y, boundary);
}
template <bool kSsd>
void launch_backward(const ScanView& v, const TrainTensors& t, const float* boundary, const float* dy,
                     const TrainGrads& g, float* states, cudaStream_t stream) {
  const unsigned blocks = (unsigned)ceil_div(v.batch * v.channels, kWarpsPerBlock), threads = 32 * kWarpsPerBlock;
  if (v.state <= 32)
    scan_backward_kernel<1, kSsd><<<blocks, threads, 0, stream>>>(v, t, boundary, dy, g, states);
  else if (v.state <= 64)
    scan_backward_kernel<2, kSsd><<<blocks, threads, 0, stream>>>(v, t, boundary, dy, g, states);
  else if (v.state <= 128)
    scan_backward_kernel<4, kSsd><<<blocks, threads, 0, stream>>>(v, t, boundary, dy, g, states);
  else
    scan_backward_kernel<8, kSsd><<<blocks, threads, 0, stream>>>(v, t, boundary, dy, g, states);
}

// The SSD's arguments as the scan's over its expanded channels (heads · head_dim).
train::ScanArgs expanded(const train::SsdTrainArgs& a) {
  train::ScanArgs s;
  s.batch = a.batch, s.length = a.length, s.channels = a.heads * a.head_dim, s.state = a.state;
  s.groups = a.groups, s.chunk = a.chunk, s.softplus = a.softplus, s.dt_min = a.dt_min, s.dt_max = a.dt_max;
  return s;
}

size_t workspace_bytes(const train::ScanArgs& a) {
  return (size_t)(a.batch * a.channels * std::min(a.chunk, a.length) * a.state) * sizeof(float);
}

// dB, dC (and the SSD's ddt) are (=) outputs made of atomic sums: zeroed first.
Status zero_sums(const train::ScanArgs& a, float* dB, float* dC, float* ddt, int64_t heads, cudaStream_t stream,
                 const char* op) {
  const size_t bc_bytes = (size_t)(a.batch * a.length * a.groups * a.state) * sizeof(float);
  MSSM_CUDA_TRY(op, cudaMemsetAsync(dB, 0, bc_bytes, stream));
  MSSM_CUDA_TRY(op, cudaMemsetAsync(dC, 0, bc_bytes, stream));
  if (ddt) MSSM_CUDA_TRY(op, cudaMemsetAsync(ddt, 0, (size_t)(a.batch * a.length * heads) * sizeof(float), stream));
  return {};
}

}  // namespace

Status scan_train_forward(const train::ScanArgs& a, const train::ScanTensors<float>& t, float* y, float* boundary,
                          cudaStream_t stream) {
  const char* op = "scan_train_forward";
  ScanView v;
  MSSM_STATUS_TRY(check(a, 0, op, &v));
  launch_forward<false>(v, TrainTensors{t.u, t.delta, t.A, t.B, t.C, t.D, t.z, t.delta_bias}, y, boundary, stream);
  return detail::check_launch(op);
}

size_t scan_train_backward_workspace_bytes(const train::ScanArgs& a) { return workspace_bytes(a); }

Status scan_train_backward(const train::ScanArgs& a, const train::ScanTensors<float>& t, const float* boundary,
                           const float* dy, const train::ScanGrads<float>& g, void* workspace, cudaStream_t stream) {
  const char* op = "scan_train_backward";
  ScanView v;
  MSSM_STATUS_TRY(check(a, 0, op, &v));
  if (!g.du || !g.ddelta || !g.dA || !g.dB || !g.dC) return detail::error(op, "du, ddelta, dA, dB and dC are required");
  if (!workspace) return detail::error(op, "a workspace of scan_train_backward_workspace_bytes() is required");
  MSSM_STATUS_TRY(zero_sums(a, g.dB, g.dC, nullptr, 0, stream, op));
  // As the CPU's: dD, dz and ddelta_bias are skipped when null, and ignored when D, z or delta_bias is.
  launch_backward<false>(v, TrainTensors{t.u, t.delta, t.A, t.B, t.C, t.D, t.z, t.delta_bias}, boundary, dy,
                         TrainGrads{g.du, g.ddelta, g.dA, g.dB, g.dC, t.D ? g.dD : nullptr, t.z ? g.dz : nullptr,
                                    t.delta_bias ? g.ddelta_bias : nullptr},
                         static_cast<float*>(workspace), stream);
  return detail::check_launch(op);
}

Status ssd_train_forward(const train::SsdTrainArgs& a, const train::SsdTrainTensors<float>& t, float* y,
                         float* boundary, cudaStream_t stream) {
  const char* op = "ssd_train_forward";
  if (a.heads < 1 || a.head_dim < 1) return detail::error(op, "heads and head_dim must be at least 1");
  const train::ScanArgs s = expanded(a);
  ScanView v;
  MSSM_STATUS_TRY(check(s, a.head_dim, op, &v));
  launch_forward<true>(v, TrainTensors{t.x, t.dt, t.A, t.B, t.C, t.D, nullptr, t.dt_bias}, y, boundary, stream);
  return detail::check_launch(op);
}

size_t ssd_train_backward_workspace_bytes(const train::SsdTrainArgs& a, SsdBackwardForm form) {
  if (a.batch < 1 || a.length < 1 || a.heads < 1 || a.head_dim < 1 || a.state < 1 || a.chunk < 1) return 0;
  const size_t recurrent = workspace_bytes(expanded(a)), chunked = detail::ssd_backward_chunked_workspace_bytes(a);
  switch (form) {
    case SsdBackwardForm::recurrent: return recurrent;
    case SsdBackwardForm::chunked: return chunked;
    default: return std::max(recurrent, chunked);
  }
}

SsdBackwardForm ssd_train_backward_form(const train::SsdTrainArgs& a, SsdMath math) {
  if (a.batch < 1 || a.length < 1 || a.heads < 1 || a.head_dim < 1 || a.state < 1 || a.chunk < 1)
    return SsdBackwardForm::recurrent;
  return detail::ssd_backward_chunked_tile(a, math) > 0 ? SsdBackwardForm::chunked : SsdBackwardForm::recurrent;
}

Status ssd_train_backward(const train::SsdTrainArgs& a, const train::SsdTrainTensors<float>& t, const float* boundary,
                          const float* dy, const train::SsdTrainGrads<float>& g, void* workspace, cudaStream_t stream,
                          SsdBackwardForm form, SsdMath math) {
  const char* op = "ssd_train_backward";
  if (a.heads < 1 || a.head_dim < 1) return detail::error(op, "heads and head_dim must be at least 1");
  const train::ScanArgs s = expanded(a);
  ScanView v;
  MSSM_STATUS_TRY(check(s, a.head_dim, op, &v));
  if (!g.dx || !g.ddt || !g.dA || !g.dB || !g.dC) return detail::error(op, "dx, ddt, dA, dB and dC are required");
  if (!workspace) return detail::error(op, "a workspace of ssd_train_backward_workspace_bytes() is required");
  const int tile = form == SsdBackwardForm::recurrent ? 0 : detail::ssd_backward_chunked_tile(a, math);
  if (form == SsdBackwardForm::chunked && tile == 0)
    return detail::error(op, "the chunked form's tiles (chunk " + std::to_string(a.chunk) + ", head_dim " +
                                 std::to_string(a.head_dim) + ", state " + std::to_string(a.state) +
                                 ") do not fit this device's shared memory; use the recurrent form");
  // The chunked form writes every ddt itself; the recurrent one sums it atomically over a head's channels.
  MSSM_STATUS_TRY(zero_sums(s, g.dB, g.dC, tile > 0 ? nullptr : g.ddt, a.heads, stream, op));
  if (tile > 0) return detail::ssd_backward_chunked(a, t, boundary, dy, g, math, tile, workspace, stream);
  // dD and ddt_bias are ignored when D and dt_bias are null (ssd_chunked.h).
  launch_backward<true>(v, TrainTensors{t.x, t.dt, t.A, t.B, t.C, t.D, nullptr, t.dt_bias}, boundary, dy,
                        TrainGrads{g.dx, g.ddt, g.dA, g.dB, g.dC, t.D ? g.dD : nullptr, nullptr,
                                   t.dt_bias ? g.ddt_bias : nullptr},
                        static_cast<float*>(workspace), stream);
  return detail::check_launch(op);
}

}  // namespace mssm::cuda
