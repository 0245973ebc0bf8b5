// Mamba-2 state-space duality (SSD) on the GPU: the chunked algorithm for whole sequences (prefill)
// and the one-token recurrence (decode).
//
// Glossary (sizes as in kernels.h):
//   b  batch       L  length (tokens)     H  heads       P  head_dim      N  state
//   G  groups: head h reads B and C of group g(h) = h / (H/G)             Q  chunk length (GPU's own)
//   c  chunk       i, j  tokens inside a chunk (i: output, j: input, j ≤ i)
//   dt'  processed step: clamp(softplus(dt + dt_bias), dt_min, dt_max)
//   a_t = dt'_t·A[h] ≤ 0, the log of the decay at token t;  cum[i] = Σ_{k≤i} a_k inside one chunk
//
// The recurrence:  s_t = exp(a_t)·s_{t-1} + dt'_t·x_t ⊗ B_t,  y_t = s_t·C_t + D·x_t  (s[h] is [P, N]).
// The chunked form (Mamba-2 paper, "SSD algorithm"), four kernels:
//   1 chunk_prepare  dt' and cum per (b, h, c); cum in double so that cum[i] - cum[j] stays exact
//   2 chunk_state    S_c = Σ_j exp(cum[last] - cum[j])·dt'_j·x_j ⊗ B_j        = X̃ᵀ·B     [P,Q]·[Q,N]
//   3 state_pass     S_enter[c] = running;  running = exp(cum[last])·running + S_c   (sequential in c)
//   4 chunk_scan     y_i = Σ_{j≤i} exp(cum[i] - cum[j])·(C_i·B_j)·dt'_j·x_j      = (Lseg ⊙ C·Bᵀ)·X
//                        + exp(cum[i])·C_i·S_enterᵀ + D·x_i,  then ·silu(z_i)
// Kernels 2 and 4 run one block per (b, h, c) and do their products on tiles staged in shared memory,
// either as fp32 dot products on the CUDA cores or as bf16 wmma tiles (16×16×16) on the tensor cores
// with fp32 accumulators. Sizes are padded to multiples of 16 with zeros, which add nothing.
//
// Precision of the tensor-core path: "split bf16" operands (ssd_tiles.h, where the tile helpers live).
// A single bf16 rounding of the fp32 operands is not enough for 1e-2 of max error against the fp32
// kernel: a host emulation (same rounding at the same places) of the test's cases gave a worst
// |err|/(|want| + RMS) of 0.047 for y with every operand in plain bf16 (matching the H200's 0.0472),
// 0.038 with only B, C and x rounded once (M and S_enter exact), 0.025 with B, C, x exact but M and
// S_enter in bf16, 0.0086 with everything in tf32, and 1e-4 with every operand split as here.
// The decay factors exp(cum[i] - cum[j]), dt' and the state passing between chunks stay fp32.
//
// Every staging loop issues several independent loads per thread before it stores any (kBatch), so
// that a block keeps many bytes in flight instead of one load per thread per round trip.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda_common.cuh"
#include "ssd_tiles.h"

namespace mssm::cuda {
namespace {

using detail::ceil_div;
using namespace tiles;

// Byte offsets of the shared-memory buffers of kernels 2 and 4 (the same on host and device). Operand
// tiles have planes<T>() planes of rows × lead<T>(cols) elements each.

// Kernel 2: X̃ [Q][Pp], B [Q][Np] (operand tiles), S_c [Pp][Np] (fp32).
struct StateLayout {
  size_t cum, dtp, x, b, s, total;
};
template <typename T>
__host__ __device__ StateLayout state_layout(int Q, int Pp, int Np) {
  StateLayout s{};
  size_t at = 0;
  s.cum = at, at = align128(at + sizeof(double) * Q);
  s.dtp = at, at = align128(at + sizeof(float) * Q);
  s.x = at, at = align128(at + tile_bytes<T>(Q, Pp));
  s.b = at, at = align128(at + tile_bytes<T>(Q, Np));
  s.s = at, at = align128(at + sizeof(float) * (size_t)Pp * lead_f32(Np));
  s.total = at;
  return s;
}

// Kernel 4: C [Q][Np], B then S_enter [max(Q, Pp)][Np], X [Q][Pp], masked C·Bᵀ M [Q][Q] (operand
// tiles), and one fp32 buffer F: C·Bᵀ [Q][Q] until M is built, then y [Q][Pp].
struct ScanLayout {
  int rows_bs;
  size_t cum, dtp, c, bs, x, m, f, total;
};
template <typename T>
__host__ __device__ ScanLayout scan_layout(int Q, int Pp, int Np) {
  ScanLayout s{};
  s.rows_bs = Q > Pp ? Q : Pp;
  size_t at = 0;
  s.cum = at, at = align128(at + sizeof(double) * Q);
  s.dtp = at, at = align128(at + sizeof(float) * Q);
  s.c = at, at = align128(at + tile_bytes<T>(Q, Np));
  s.bs = at, at = align128(at + tile_bytes<T>(s.rows_bs, Np));
  s.x = at, at = align128(at + tile_bytes<T>(Q, Pp));
  s.m = at, at = align128(at + tile_bytes<T>(Q, Q));
  const int cols_f = Q > Pp ? Q : Pp;
  s.f = at, at = align128(at + sizeof(float) * (size_t)Q * lead_f32(cols_f));
  s.total = at;
  return s;
}

template <typename T>
size_t shared_bytes(int Q, int Pp, int Np) {
  const size_t a = state_layout<T>(Q, Pp, Np).total, b = scan_layout<T>(Q, Pp, Np).total;
  return a > b ? a : b;
}

__device__ __forceinline__ float process_dt(const cpu::SsdArgs& a, float raw, int64_t h) {
  float v = raw + (a.dt_bias ? a.dt_bias[h] : 0.0f);
  if (a.dt_softplus) v = detail::softplus(v);
  return fminf(fmaxf(v, a.dt_min), a.dt_max);
}

// Kernel 1: one thread per (b, h, c). Q is a multiple of 16.
__global__ void chunk_prepare_kernel(cpu::SsdArgs a, int Q, int64_t chunks, float* dtp, double* cum) {
  const int64_t item = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;  // (b·H + h)·chunks + c
  if (item >= a.batch * a.heads * chunks) return;
  const int64_t c = item % chunks, h = item / chunks % a.heads, b = item / (chunks * a.heads);
  const int64_t t0 = c * Q, len = detail::min64(Q, a.length - t0);
  const double A = a.A[h];
  double sum = 0;
  for (int j0 = 0; j0 < Q; j0 += 16) {
    float raw[16];
#pragma unroll
    for (int u = 0; u < 16; ++u) raw[u] = j0 + u < len ? a.dt[(b * a.length + t0 + j0 + u) * a.heads + h] : 0.0f;
#pragma unroll
    for (int u = 0; u < 16; ++u) {
      const float v = j0 + u < len ? process_dt(a, raw[u], h) : 0.0f;
      sum += (double)v * A;
      dtp[item * Q + j0 + u] = v;
      cum[item * Q + j0 + u] = sum;  // padding tokens repeat the last value: their decay is 1
    }
  }
}

// Stages cum and dt' of chunk `item` and returns its token count.
__device__ int stage_chunk(const cpu::SsdArgs& a, int Q, int64_t chunks, int64_t item, const float* dtp,
                           const double* cum, double* cum_s, float* dtp_s) {
  for (int j = threadIdx.x; j < Q; j += kThreads) {
    cum_s[j] = cum[item * Q + j];
    dtp_s[j] = dtp[item * Q + j];
  }
  return (int)detail::min64(Q, a.length - (item % chunks) * Q);
}

// Kernel 2: S_c[p, n] = Σ_j X̃[j, p]·B[j, n], X̃[j, p] = exp(cum[last] - cum[j])·dt'_j·x[j, p].
template <typename T>
__global__ void __launch_bounds__(kThreads) chunk_state_kernel(cpu::SsdArgs a, int Q, int64_t chunks, const float* dtp,
                                                               const double* cum, float* states) {
  extern __shared__ float4 shared_raw[];
  char* base = reinterpret_cast<char*>(shared_raw);
  const int64_t H = a.heads, P = a.head_dim, N = a.state, G = a.groups, L = a.length;
  const int Pp = round16(P), Np = round16(N);
  const StateLayout s = state_layout<T>(Q, Pp, Np);
  double* cum_s = reinterpret_cast<double*>(base + s.cum);
  float* dtp_s = reinterpret_cast<float*>(base + s.dtp);
  T* X = reinterpret_cast<T*>(base + s.x);
  T* Bs = reinterpret_cast<T*>(base + s.b);
  float* S = reinterpret_cast<float*>(base + s.s);
  const int ldP = lead<T>(Pp), ldN = lead<T>(Np), ldS = lead_f32(Np);
  const int planeX = plane_size(Q, ldP), planeB = plane_size(Q, ldN);

  const int64_t item = blockIdx.x;
  const int64_t c = item % chunks, h = item / chunks % H, b = item / (chunks * H), g = h / (H / G);
  const int64_t t0 = c * Q;
  const int len = stage_chunk(a, Q, chunks, item, dtp, cum, cum_s, dtp_s);
  __syncthreads();
  const double last = cum_s[len - 1];
  const float* xc = a.x + ((b * L + t0) * H + h) * P;  // token j, p: xc[j·H·P + p]
  const float* Bc = a.B + ((b * L + t0) * G + g) * N;  // token j, n: Bc[j·G·N + n]
  staged(
      Q * Pp,
      [&](int e) {
        const int j = e / Pp, p = e % Pp;
        return j < len && p < P ? xc[j * H * P + p] : 0.0f;
      },
      [&](int e, float v) {
        const int j = e / Pp, p = e % Pp;
        put(X, planeX, j * ldP + p, j < len ? expf((float)(last - cum_s[j])) * dtp_s[j] * v : 0.0f);
      });
  staged(
      Q * Np,
      [&](int e) {
        const int j = e / Np, n = e % Np;
        return j < len && n < N ? Bc[j * G * N + n] : 0.0f;
      },
      [&](int e, float v) { put(Bs, planeB, (e / Np) * ldN + e % Np, v); });
  __syncthreads();
  block_matmul<T, true, false>(S, ldS, X, ldP, planeX, Bs, ldN, planeB, Pp, Np, Q, false);
  float* out = states + item * P * N;
  for (int64_t e = threadIdx.x; e < P * N; e += kThreads) out[e] = S[(e / N) * ldS + e % N];
}

// Kernel 3: one thread per (b, h, element of the state); states[c] becomes the state entering chunk c.
// kBatch chunks at a time: their states and decays are loaded before the first is used.
__global__ void state_pass_kernel(cpu::SsdArgs a, int Q, int64_t chunks, const double* cum, float* states) {
  const int64_t PN = a.head_dim * a.state;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;  // (b·H + h)·PN + e
  if (i >= a.batch * a.heads * PN) return;
  const int64_t bh = i / PN, e = i % PN;
  float running = a.state_in ? a.state_in[i] : 0.0f;
  for (int64_t c0 = 0; c0 < chunks; c0 += kBatch) {
    float chunk_state[kBatch], decay[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t c = c0 + u, item = bh * chunks + c;
      if (c < chunks) {
        const int len = (int)detail::min64(Q, a.length - c * Q);
        chunk_state[u] = states[item * PN + e];
        decay[u] = expf((float)cum[item * Q + len - 1]);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t c = c0 + u;
      if (c < chunks) {
        states[(bh * chunks + c) * PN + e] = running;
        running = fmaf(decay[u], running, chunk_state[u]);
      }
    }
  }
  if (a.state_out) a.state_out[i] = running;  // this thread alone read state_in[i]: aliasing is fine
}

// Kernel 4: y for one (b, h, c).
template <typename T>
__global__ void __launch_bounds__(kThreads) chunk_scan_kernel(cpu::SsdArgs a, int Q, int64_t chunks, const float* dtp,
                                                              const double* cum, const float* states) {
  extern __shared__ float4 shared_raw[];
  char* base = reinterpret_cast<char*>(shared_raw);
  const int64_t H = a.heads, P = a.head_dim, N = a.state, G = a.groups, L = a.length;
  const int Pp = round16(P), Np = round16(N);
  const ScanLayout s = scan_layout<T>(Q, Pp, Np);
  double* cum_s = reinterpret_cast<double*>(base + s.cum);
  float* dtp_s = reinterpret_cast<float*>(base + s.dtp);
  T* Cs = reinterpret_cast<T*>(base + s.c);
  T* BS = reinterpret_cast<T*>(base + s.bs);
  T* X = reinterpret_cast<T*>(base + s.x);
  T* M = reinterpret_cast<T*>(base + s.m);
  float* CB = reinterpret_cast<float*>(base + s.f);
  float* Y = CB;  // once M is built
  const int ldN = lead<T>(Np), ldP = lead<T>(Pp), ldQ = lead<T>(Q), ldCB = lead_f32(Q), ldY = lead_f32(Pp);
  const int planeC = plane_size(Q, ldN), planeBS = plane_size(s.rows_bs, ldN), planeX = plane_size(Q, ldP),
            planeM = plane_size(Q, ldQ);

  const int64_t item = blockIdx.x;
  const int64_t c = item % chunks, h = item / chunks % H, b = item / (chunks * H), g = h / (H / G);
  const int64_t t0 = c * Q;
  const int len = stage_chunk(a, Q, chunks, item, dtp, cum, cum_s, dtp_s);
  const float* Bc = a.B + ((b * L + t0) * G + g) * N;  // token j, n: Bc[j·G·N + n]
  const float* Cc = a.C + ((b * L + t0) * G + g) * N;
  const float* xc = a.x + ((b * L + t0) * H + h) * P;  // token j, p: xc[j·H·P + p]
  staged(
      Q * Np,
      [&](int e) {
        const int j = e / Np, n = e % Np;
        return j < len && n < N ? Cc[j * G * N + n] : 0.0f;
      },
      [&](int e, float v) { put(Cs, planeC, (e / Np) * ldN + e % Np, v); });
  staged(
      Q * Np,
      [&](int e) {
        const int j = e / Np, n = e % Np;
        return j < len && n < N ? Bc[j * G * N + n] : 0.0f;
      },
      [&](int e, float v) { put(BS, planeBS, (e / Np) * ldN + e % Np, v); });
  staged(
      Q * Pp,
      [&](int e) {
        const int j = e / Pp, p = e % Pp;
        return j < len && p < P ? xc[j * H * P + p] : 0.0f;
      },
      [&](int e, float v) { put(X, planeX, (e / Pp) * ldP + e % Pp, v); });
  __syncthreads();

  // C·Bᵀ: Bᵀ(n, j) = B[j][n] is column-major with leading dimension ldN.
  block_matmul<T, false, true>(CB, ldCB, Cs, ldN, planeC, BS, ldN, planeBS, Q, Q, Np, false);

  // M[i, j] = (C_i·B_j)·exp(cum[i] - cum[j])·dt'_j for j ≤ i (the decay segment sum), else 0, rounded
  // once (split bf16: hi + lo); and S_enter [P][N] replaces B.
  for (int e = threadIdx.x; e < Q * Q; e += kThreads) {
    const int i = e / Q, j = e % Q;
    float v = 0.0f;
    if (j <= i && i < len) v = CB[i * ldCB + j] * expf((float)(cum_s[i] - cum_s[j])) * dtp_s[j];
    put(M, planeM, i * ldQ + j, v);
  }
  const float* entering = states + item * P * N;
  staged(
      Pp * Np,
      [&](int e) {
        const int p = e / Np, n = e % Np;
        return p < P && n < N ? entering[p * N + n] : 0.0f;
      },
      [&](int e, float v) { put(BS, planeBS, (e / Np) * ldN + e % Np, v); });
  __syncthreads();  // M is built: Y may overwrite C·Bᵀ

  // Y_off = C·S_enterᵀ: S_enterᵀ(n, p) = S[p][n], column-major; then each row times exp(cum[i]).
  block_matmul<T, false, true>(Y, ldY, Cs, ldN, planeC, BS, ldN, planeBS, Q, Pp, Np, false);
  for (int e = threadIdx.x; e < Q * Pp; e += kThreads) {
    const int i = e / Pp, p = e % Pp;
    Y[i * ldY + p] *= expf((float)cum_s[i]);
  }
  __syncthreads();
  // Y += M·X
  block_matmul<T, false, false>(Y, ldY, M, ldQ, planeM, X, ldP, planeX, Q, Pp, Q, true);

  const float D = a.D ? a.D[h] : 0.0f;
  const int count = len * (int)P;
  for (int e0 = threadIdx.x; e0 < count; e0 += kThreads * kBatch) {
    float xv[kBatch], zv[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = e0 + u * kThreads;
      xv[u] = zv[u] = 0.0f;
      if (e < count) {
        const int64_t at = ((b * L + t0 + e / (int)P) * H + h) * P + e % (int)P;
        xv[u] = a.x[at];
        if (a.z) zv[u] = a.z[at];
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = e0 + u * kThreads;
      if (e < count) {
        const int i = e / (int)P, p = e % (int)P;
        const int64_t at = ((b * L + t0 + i) * H + h) * P + p;
        float v = Y[i * ldY + p] + D * xv[u];
        if (a.z) v *= detail::silu(zv[u]);
        a.y[at] = v;
      }
    }
  }
}

// One token: warp per (b, h, p), lanes over n.
__global__ void ssd_step_kernel(cpu::SsdArgs a) {
  const int64_t H = a.heads, P = a.head_dim, N = a.state, G = a.groups;
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // (b·H + h)·P + p
  const int l = threadIdx.x % 32;
  if (row >= a.batch * H * P) return;
  const int64_t bh = row / P, h = bh % H, b = bh / H, g = h / (H / G);
  const float dtp = process_dt(a, a.dt[bh], h);
  const float decay = expf(dtp * a.A[h]);
  const float xdt = dtp * a.x[row];
  const float* Bv = a.B + (b * G + g) * N;
  const float* Cv = a.C + (b * G + g) * N;
  float acc = 0.0f;
  for (int64_t n = l; n < N; n += 32) {
    const float prev = a.state_in ? a.state_in[row * N + n] : 0.0f;
    const float s = fmaf(decay, prev, xdt * Bv[n]);
    a.state_out[row * N + n] = s;
    acc = fmaf(s, Cv[n], acc);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (l == 0) {
    float v = acc + (a.D ? a.D[h] * a.x[row] : 0.0f);
    if (a.z) v *= detail::silu(a.z[row]);
    a.y[row] = v;
  }
}

Status check_args(const char* op, const cpu::SsdArgs& a) {
  if (a.batch < 0 || a.length < 0 || a.heads < 0 || a.head_dim < 0 || a.state < 0)
    return detail::error(op, "negative size");
  if (a.groups <= 0 || (a.heads > 0 && a.heads % a.groups != 0))
    return detail::error(op, "heads (" + std::to_string(a.heads) + ") must be a multiple of groups (" +
                                 std::to_string(a.groups) + ")");
  if (a.batch * a.heads * a.head_dim * a.state > 0) {
    if (!a.A) return detail::error(op, "A must be set");
    if (a.length > 0 && (!a.x || !a.dt || !a.B || !a.C || !a.y)) return detail::error(op, "x, dt, B, C and y must be set");
  }
  return {};
}

// The largest chunk (64, 32 or 16 tokens) whose tiles fit this device's shared memory; 0 if none.
int choose_chunk(const cpu::SsdArgs& a, SsdMath math) {
  const int Pp = round16(a.head_dim), Np = round16(a.state);
  const size_t limit = (size_t)detail::shared_limit();
  for (int Q = 64; Q >= 16; Q /= 2) {
    const size_t need = math == SsdMath::fp32 ? shared_bytes<float>(Q, Pp, Np) : shared_bytes<__nv_bfloat16>(Q, Pp, Np);
    if (need <= limit) return Q;
  }
  return 0;
}

struct Workspace {
  size_t dtp, cum, states, total;
};
Workspace workspace_layout(const cpu::SsdArgs& a, int Q) {
  const int64_t chunks = Q > 0 ? ceil_div(a.length, Q) : 0;
  const int64_t items = a.batch * a.heads * chunks;
  Workspace w{};
  size_t at = 0;
  w.dtp = at, at = (at + sizeof(float) * items * Q + 255) / 256 * 256;
  w.cum = at, at = (at + sizeof(double) * items * Q + 255) / 256 * 256;
  w.states = at, at = (at + sizeof(float) * items * a.head_dim * a.state + 255) / 256 * 256;
  w.total = at;
  return w;
}

template <typename T>
Status launch_chunked(const cpu::SsdArgs& a, int Q, char* work, const Workspace& w, cudaStream_t stream) {
  const char* op = "ssd_chunked";
  const int64_t chunks = ceil_div(a.length, Q);
  const int64_t items = a.batch * a.heads * chunks;
  if (items > 0x7fffffff) return detail::error(op, "too many chunks");
  float* dtp = reinterpret_cast<float*>(work + w.dtp);
  double* cum = reinterpret_cast<double*>(work + w.cum);
  float* states = reinterpret_cast<float*>(work + w.states);
  const int Pp = round16(a.head_dim), Np = round16(a.state);
  const size_t shared_state = state_layout<T>(Q, Pp, Np).total, shared_scan = scan_layout<T>(Q, Pp, Np).total;
  MSSM_CUDA_TRY(op, cudaFuncSetAttribute(chunk_state_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)shared_state));
  MSSM_CUDA_TRY(op, cudaFuncSetAttribute(chunk_scan_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)shared_scan));

  chunk_prepare_kernel<<<(unsigned)ceil_div(items, 128), 128, 0, stream>>>(a, Q, chunks, dtp, cum);
  MSSM_STATUS_TRY(detail::check_launch(op));
  chunk_state_kernel<T><<<(unsigned)items, kThreads, shared_state, stream>>>(a, Q, chunks, dtp, cum, states);
  MSSM_STATUS_TRY(detail::check_launch(op));
  const int64_t elements = a.batch * a.heads * a.head_dim * a.state;
  state_pass_kernel<<<(unsigned)ceil_div(elements, 256), 256, 0, stream>>>(a, Q, chunks, cum, states);
  MSSM_STATUS_TRY(detail::check_launch(op));
  chunk_scan_kernel<T><<<(unsigned)items, kThreads, shared_scan, stream>>>(a, Q, chunks, dtp, cum, states);
  return detail::check_launch(op);
}

}  // namespace

size_t ssd_chunked_workspace_bytes(const cpu::SsdArgs& args) {
  // A shorter chunk needs more per-chunk states: size for the shorter chunk of the two paths (the split
  // bf16 tiles, two 2-byte planes with wider row padding, can be the larger).
  int Q = 64;
  for (SsdMath math : {SsdMath::fp32, SsdMath::bf16_tensor}) {
    const int q = choose_chunk(args, math);
    if (q > 0 && q < Q) Q = q;
  }
  return workspace_layout(args, Q).total;
}

Status ssd_chunked(const cpu::SsdArgs& args, SsdMath math, void* workspace, cudaStream_t stream) {
  const char* op = "ssd_chunked";
  MSSM_STATUS_TRY(check_args(op, args));
  const int64_t state_floats = args.batch * args.heads * args.head_dim * args.state;
  if (state_floats == 0) return {};
  if (args.length == 0) {  // no tokens: the state passes through unchanged
    if (args.state_out && args.state_out != args.state_in) {
      if (args.state_in)
        MSSM_CUDA_TRY(op, cudaMemcpyAsync(args.state_out, args.state_in, state_floats * sizeof(float),
                                          cudaMemcpyDeviceToDevice, stream));
      else
        MSSM_CUDA_TRY(op, cudaMemsetAsync(args.state_out, 0, state_floats * sizeof(float), stream));
    }
    return {};
  }
  const int Q = choose_chunk(args, math);
  if (Q == 0)
    return detail::error(op, "head_dim " + std::to_string(args.head_dim) + " × state " + std::to_string(args.state) +
                                 " needs more shared memory than this device has");
  const Workspace w = workspace_layout(args, Q);
  char* work = static_cast<char*>(workspace);
  const bool own = work == nullptr;
  if (own) MSSM_CUDA_TRY(op, cudaMallocAsync(reinterpret_cast<void**>(&work), w.total, stream));
  Status status = math == SsdMath::fp32 ? launch_chunked<float>(args, Q, work, w, stream)
                                        : launch_chunked<__nv_bfloat16>(args, Q, work, w, stream);
  if (own) {
    const cudaError_t e = cudaFreeAsync(work, stream);
    if (status.ok() && e != cudaSuccess) return detail::cuda_error(op, "cudaFreeAsync", e);
  }
  return status;
}

Status ssd_step(const cpu::SsdArgs& args, cudaStream_t stream) {
  const char* op = "ssd_step";
  MSSM_STATUS_TRY(check_args(op, args));
  if (args.length != 1) return detail::error(op, "length must be 1 (got " + std::to_string(args.length) + ")");
  if (!args.state_out) return detail::error(op, "state_out must be set");
  const int64_t rows = args.batch * args.heads * args.head_dim;
  if (rows == 0 || args.state == 0) return {};
  constexpr int kRowsPerBlock = 8;
  const int64_t blocks = ceil_div(rows, kRowsPerBlock);
  if (blocks > 0x7fffffff) return detail::error(op, "too many blocks");
  ssd_step_kernel<<<(unsigned)blocks, 32 * kRowsPerBlock, 0, stream>>>(args);
  return detail::check_launch(op);
}

}  // namespace mssm::cuda
