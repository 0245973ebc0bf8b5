// The chunked (matrix) form of Mamba-2's SSD backward for training on the device: the per-item and
// per-block bodies of its four kernels, which ssd_train.cu launches. The equations and gradient
// conventions are native/train/ssd_chunked.h's (SsdTrainArgs, SsdTrainTensors, SsdTrainGrads, the
// boundary states of its forward), and the algorithm is ssd_chunked.cpp's backward, with the work of a
// chunk done by one block and the adjoint carried between chunks by a pass of its own.
//
// The header compiles without nvcc too (ssd_tiles.h): a CPU test runs these bodies one block at a
// time against the CPU trainer, with fp32 tiles and with emulated split bf16 ones.
//
// Glossary as in ssd_chunked.cpp, inside one chunk c of len ≤ chunk tokens of batch b and head h:
//   dt_j, slope_j   the processed step and d dt / d dt_raw (0 where clamped)
//   cs_i = Σ_{k≤i} dt_k·A (double),  ecs_i = exp(cs_i),  w_j = exp(cs_last − cs_j),  Lm[i,j] = exp(cs_i − cs_j)
//   xd = dt ⊙ x [Q, P];  S = the state at the chunk's start [P, N] (the forward's boundary)
//   dS = the adjoint of the state at the chunk's end [P, N];  CB = C·Bᵀ [Q, Q];  M = Lm ∘ CB (j ≤ i)
//
// Kernels, items and blocks indexed item = (b·H + h)·chunks + c:
//   1 prepare      one thread per item: dt, slope and cs of its tokens (padding: dt = 0, cs repeats)
//   2 dstate       one block per item with c > 0:  G_c = (diag(ecs)·dy)ᵀ·C   [P, N]
//   3 dstate_pass  one thread per (b, h, state element), chunks last to first:
//                    dS_c = running;  running = exp(cs_last of c)·running + G_c   (dS of the last chunk: 0)
//   4 backward     one block per item, in three phases over tiles of Nt state columns:
//     A  C·Bᵀ, C·Sᵀ and B·dSᵀ, summed over the state tiles
//     B  off_i = ecs_i·dy_i·(S·C_i), q_j = w_j·xd_j·(dS·B_j);  dxd = diag(w)·B·dSᵀ + Mᵀ·dy;  dM = dy·xdᵀ;
//        dx = dt ⊙ dxd + D·dy;  W = dM ∘ M below the diagonal (its row and column sums);
//        dCB = dM ∘ Lm (j ≤ i);  da_k = Σ_{i≥k} (off_i + Σ_{j<i} W[i,j] − Σ_{m>i} W[m,i]) + E + Σ_{j<k} q_j
//        with E = exp(cs_last)·⟨dS, S⟩;  ddt_raw = (A·da + x·dxd)·slope;  dA += Σ dt·da
//     C  dC = dCB·B + diag(ecs)·dy·S,  dB = dCBᵀ·C + diag(w)·xd·dS, added atomically (the group's heads)
// dx and ddt are written by their chunk's block alone; dB and dC (zeroed by the caller) and dA, dD,
// dt_bias are sums of atomic additions, whose rounding order varies from run to run.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "scalar.h"
#include "ssd_tiles.h"
#include "train/ssd_chunked.h"

namespace mssm::cuda::ssd_backward {

using namespace tiles;

MSSM_HD constexpr int imax(int a, int b) { return a > b ? a : b; }
MSSM_HD constexpr int imin(int a, int b) { return a < b ? a : b; }

// What the four kernels read and write. Qp, Pp, Np: chunk, head_dim and state rounded up to 16; Nt: the
// state columns of one tile (a multiple of 16).
struct View {
  int64_t batch, L, H, P, N, G, chunk, chunks;
  int Qp, Pp, Np, Nt;
  bool softplus;
  float dt_min, dt_max;
  const float *x, *dt, *A, *B, *C, *D, *dt_bias, *boundary, *dy;
  float *dx, *ddt, *dA, *dB, *dC, *dD, *ddt_bias;  // dD, ddt_bias: null when skipped
  float *dtp, *slope;                              // workspace [items][Qp]
  double* cum;                                     // workspace [items][Qp]
  float* dstate;                                   // workspace [items][P][N]: G_c, then dS_c
  MSSM_HD int64_t items() const { return batch * H * chunks; }
  MSSM_HD int len(int64_t c) const { return (int)(L - c * chunk < chunk ? L - c * chunk : chunk); }
};

// Device memory of the workspace (offsets from a 256-byte aligned base).
struct Workspace {
  size_t dtp, slope, cum, dstate, total;
};
inline Workspace workspace_layout(int64_t items, int Qp, int64_t P, int64_t N) {
  auto up = [](size_t v) { return (v + 255) / 256 * 256; };
  Workspace w{};
  size_t at = 0;
  w.dtp = at, at = up(at + sizeof(float) * items * Qp);
  w.slope = at, at = up(at + sizeof(float) * items * Qp);
  w.cum = at, at = up(at + sizeof(double) * items * Qp);
  w.dstate = at, at = up(at + sizeof(float) * items * P * N);
  w.total = at;
  return w;
}

// The padded sizes of a call: Qp, Pp, Np (chunk, head_dim and state rounded up to 16).
struct Sizes {
  int Qp, Pp, Np;
};
inline Sizes sizes_of(const train::SsdTrainArgs& a) {
  return {round16(a.chunk < a.length ? a.chunk : a.length), round16(a.head_dim), round16(a.state)};
}
inline int64_t items_of(const train::SsdTrainArgs& a) { return a.batch * a.heads * ((a.length + a.chunk - 1) / a.chunk); }

// The view of one backward call (ssd_chunked.h's arguments; dD and ddt_bias are ignored without D and
// dt_bias) with state tiles of Nt columns, its workspace at `work` (workspace_layout's parts).
inline View make_view(const train::SsdTrainArgs& a, const train::SsdTrainTensors<float>& t, const float* boundary,
                      const float* dy, const train::SsdTrainGrads<float>& g, int Nt, char* work) {
  const Sizes z = sizes_of(a);
  const Workspace w = workspace_layout(items_of(a), z.Qp, a.head_dim, a.state);
  View v{};
  v.batch = a.batch, v.L = a.length, v.H = a.heads, v.P = a.head_dim, v.N = a.state, v.G = a.groups;
  v.chunk = a.chunk, v.chunks = (a.length + a.chunk - 1) / a.chunk;
  v.Qp = z.Qp, v.Pp = z.Pp, v.Np = z.Np, v.Nt = Nt;
  v.softplus = a.softplus, v.dt_min = (float)a.dt_min, v.dt_max = (float)a.dt_max;
  v.x = t.x, v.dt = t.dt, v.A = t.A, v.B = t.B, v.C = t.C, v.D = t.D, v.dt_bias = t.dt_bias;
  v.boundary = boundary, v.dy = dy;
  v.dx = g.dx, v.ddt = g.ddt, v.dA = g.dA, v.dB = g.dB, v.dC = g.dC;
  v.dD = t.D ? g.dD : nullptr, v.ddt_bias = t.dt_bias ? g.ddt_bias : nullptr;
  v.dtp = reinterpret_cast<float*>(work + w.dtp), v.slope = reinterpret_cast<float*>(work + w.slope);
  v.cum = reinterpret_cast<double*>(work + w.cum), v.dstate = reinterpret_cast<float*>(work + w.dstate);
  return v;
}

// ---- Kernel 1 -------------------------------------------------------------------------------------

MSSM_BLOCK_FN void prepare_item(const View& v, int64_t item) {
  const int64_t c = item % v.chunks, h = item / v.chunks % v.H, b = item / (v.chunks * v.H);
  const int64_t t0 = c * v.chunk;
  const int len = v.len(c);
  const double A = v.A[h];
  const float bias = v.dt_bias ? v.dt_bias[h] : 0.0f;
  double sum = 0;
  for (int j = 0; j < v.Qp; ++j) {
    float dt = 0.0f, slope = 0.0f;
    if (j < len)
      scalar::train_step_rule(v.softplus, v.dt_min, v.dt_max, v.dt[(b * v.L + t0 + j) * v.H + h] + bias, &dt, &slope);
    sum += (double)dt * A;
    v.dtp[item * v.Qp + j] = dt;
    v.slope[item * v.Qp + j] = slope;
    v.cum[item * v.Qp + j] = sum;
  }
}

// ---- Kernel 2 -------------------------------------------------------------------------------------

// Shared memory: diag(ecs)·dy [Qp][Pp] and C [Qp][Nt] (operand tiles), G [Pp][Nt] (fp32).
struct DstateLayout {
  size_t dy, c, g, total;
};
template <typename T>
MSSM_HD DstateLayout dstate_layout(int Qp, int Pp, int Nt) {
  DstateLayout s{};
  size_t at = 0;
  s.dy = at, at = align128(at + tile_bytes<T>(Qp, Pp));
  s.c = at, at = align128(at + tile_bytes<T>(Qp, Nt));
  s.g = at, at = align128(at + sizeof(float) * (size_t)Pp * lead_f32(Nt));
  s.total = at;
  return s;
}

template <typename T>
MSSM_BLOCK_FN void dstate_block(const View& v, int64_t item, char* base) {
  const int64_t c = item % v.chunks;
  if (c == 0) return;  // the state entering chunk 0 is zero: nothing reads its adjoint
  const int64_t h = item / v.chunks % v.H, b = item / (v.chunks * v.H), g = h / (v.H / v.G);
  const int64_t H = v.H, P = v.P, N = v.N, G = v.G, t0 = c * v.chunk;
  const int Qp = v.Qp, Pp = v.Pp, len = v.len(c);
  const DstateLayout s = dstate_layout<T>(Qp, Pp, v.Nt);
  T* DY = reinterpret_cast<T*>(base + s.dy);
  T* Ct = reinterpret_cast<T*>(base + s.c);
  float* F = reinterpret_cast<float*>(base + s.g);
  const int ldP = lead<T>(Pp), ldN = lead<T>(v.Nt), ldF = lead_f32(v.Nt);
  const int planeDY = plane_size(Qp, ldP), planeC = plane_size(Qp, ldN);
  const double* cum = v.cum + item * Qp;
  const float* dyc = v.dy + ((b * v.L + t0) * H + h) * P;  // token i, channel p: dyc[i·H·P + p]
  const float* Cc = v.C + ((b * v.L + t0) * G + g) * N;   // token i, state n: Cc[i·G·N + n]
  stage_tile(DY, planeDY, ldP, Qp, Pp, dyc, H * P, len, P, 0, [&](int i) { return expf((float)cum[i]); });
  float* out = v.dstate + item * P * N;
  for (int n0 = 0; n0 < v.Np; n0 += v.Nt) {
    const int nt = imin(v.Nt, v.Np - n0);
    stage_tile(Ct, planeC, ldN, Qp, nt, Cc, G * N, len, N, n0, Unscaled{});
    MSSM_SYNC();
    block_matmul<T, true, false>(F, ldF, DY, ldP, planeDY, Ct, ldN, planeC, Pp, nt, Qp, false);
    for (int e = MSSM_RANK; e < P * nt; e += MSSM_STRIDE) {
      const int p = e / nt, n = e % nt;
      if (n0 + n < N) out[p * N + n0 + n] = F[p * ldF + n];
    }
    // The next tile's staging writes only Ct, which no thread reads after block_matmul's barrier; F is
    // written again only after the next barrier.
  }
}

// ---- Kernel 3 -------------------------------------------------------------------------------------

// Element i = (b·H + h)·P·N + e of every chunk's dstate, chunks last to first.
MSSM_BLOCK_FN void dstate_pass_element(const View& v, int64_t i) {
  const int64_t PN = v.P * v.N, bh = i / PN, e = i % PN;
  float running = 0.0f;
  for (int64_t c = v.chunks - 1; c >= 0; --c) {
    const int64_t item = bh * v.chunks + c;
    float* at = v.dstate + item * PN + e;
    if (c == 0) {
      *at = running;
      break;
    }
    const float g = *at;
    *at = running;
    running = fmaf(expf((float)v.cum[item * v.Qp + v.len(c) - 1]), running, g);
  }
}

// ---- Kernel 4 -------------------------------------------------------------------------------------

// Shared memory: the chunk's vectors; C, B [Qp][Nt], S, dS [Pp][Nt], xd (later w ⊙ xd) and dy (later
// ecs ⊙ dy) [Qp][Pp], M (later dCB) [Qp][Qp] as operand tiles; fp32 F1 (C·Bᵀ, later dC's tile), F2
// (C·Sᵀ, then dM, later dB's tile) and F3 (B·dSᵀ, then dxd).
struct BackLayout {
  size_t cum, qb, red, dtp, slope, ecs, w, off, q, rowsum, colsum, ddtx, c, b, s, ds, x, dy, mw, f1, f2, f3, total;
};
MSSM_HD constexpr int f1_cols(int Qp, int Nt) { return imax(Qp, Nt); }
MSSM_HD constexpr int f2_cols(int Qp, int Pp, int Nt) { return imax(imax(Qp, Pp), Nt); }

template <typename T>
MSSM_HD BackLayout back_layout(int Qp, int Pp, int Nt) {
  BackLayout s{};
  size_t at = 0;
  s.cum = at, at = align128(at + sizeof(double) * Qp);
  s.qb = at, at = align128(at + sizeof(double) * Qp);
  s.red = at, at = align128(at + sizeof(double) * 2);
  size_t* vectors[] = {&s.dtp, &s.slope, &s.ecs, &s.w, &s.off, &s.q, &s.rowsum, &s.colsum, &s.ddtx};
  for (size_t* o : vectors) *o = at, at = align128(at + sizeof(float) * Qp);
  s.c = at, at = align128(at + tile_bytes<T>(Qp, Nt));
  s.b = at, at = align128(at + tile_bytes<T>(Qp, Nt));
  s.s = at, at = align128(at + tile_bytes<T>(Pp, Nt));
  s.ds = at, at = align128(at + tile_bytes<T>(Pp, Nt));
  s.x = at, at = align128(at + tile_bytes<T>(Qp, Pp));
  s.dy = at, at = align128(at + tile_bytes<T>(Qp, Pp));
  s.mw = at, at = align128(at + tile_bytes<T>(Qp, Qp));
  s.f1 = at, at = align128(at + sizeof(float) * (size_t)Qp * lead_f32(f1_cols(Qp, Nt)));
  s.f2 = at, at = align128(at + sizeof(float) * (size_t)Qp * lead_f32(f2_cols(Qp, Pp, Nt)));
  s.f3 = at, at = align128(at + sizeof(float) * (size_t)Qp * lead_f32(Pp));
  s.total = at;
  return s;
}

template <typename T>
MSSM_BLOCK_FN void backward_block(const View& v, int64_t item, char* base) {
  const int64_t H = v.H, P = v.P, N = v.N, G = v.G, L = v.L, HP = H * P, GN = G * N;
  const int Qp = v.Qp, Pp = v.Pp, Np = v.Np, Nt = v.Nt;
  const int64_t c = item % v.chunks, h = item / v.chunks % H, b = item / (v.chunks * H), g = h / (H / G);
  const int64_t t0 = c * v.chunk;
  const int len = v.len(c);
  const bool first = c == 0, last = c == v.chunks - 1;

  const BackLayout s = back_layout<T>(Qp, Pp, Nt);
  double* cum = reinterpret_cast<double*>(base + s.cum);
  double* qb = reinterpret_cast<double*>(base + s.qb);
  double* red = reinterpret_cast<double*>(base + s.red);  // [0] ⟨dS, S⟩, [1] Σ dy·x (for dD)
  float* dtp = reinterpret_cast<float*>(base + s.dtp);
  float* slope = reinterpret_cast<float*>(base + s.slope);
  float* ecs = reinterpret_cast<float*>(base + s.ecs);
  float* w = reinterpret_cast<float*>(base + s.w);
  float* off = reinterpret_cast<float*>(base + s.off);
  float* q = reinterpret_cast<float*>(base + s.q);
  float* rowsum = reinterpret_cast<float*>(base + s.rowsum);
  float* colsum = reinterpret_cast<float*>(base + s.colsum);
  float* ddtx = reinterpret_cast<float*>(base + s.ddtx);
  T* Ct = reinterpret_cast<T*>(base + s.c);
  T* Bt = reinterpret_cast<T*>(base + s.b);
  T* St = reinterpret_cast<T*>(base + s.s);
  T* dSt = reinterpret_cast<T*>(base + s.ds);
  T* X = reinterpret_cast<T*>(base + s.x);
  T* DY = reinterpret_cast<T*>(base + s.dy);
  T* MW = reinterpret_cast<T*>(base + s.mw);
  float* F1 = reinterpret_cast<float*>(base + s.f1);
  float* F2 = reinterpret_cast<float*>(base + s.f2);
  float* F3 = reinterpret_cast<float*>(base + s.f3);
  const int ldN = lead<T>(Nt), ldP = lead<T>(Pp), ldQ = lead<T>(Qp);
  const int ldF1 = lead_f32(f1_cols(Qp, Nt)), ldF2 = lead_f32(f2_cols(Qp, Pp, Nt)), ldF3 = lead_f32(Pp);
  const int pC = plane_size(Qp, ldN), pS = plane_size(Pp, ldN), pX = plane_size(Qp, ldP), pM = plane_size(Qp, ldQ);

  const float* xc = v.x + ((b * L + t0) * H + h) * P;   // token j, channel p: xc[j·H·P + p]
  const float* dyc = v.dy + ((b * L + t0) * H + h) * P;
  const float* Bc = v.B + ((b * L + t0) * G + g) * N;   // token j, state n: Bc[j·G·N + n]
  const float* Cc = v.C + ((b * L + t0) * G + g) * N;
  const float* S0 = v.boundary + ((b * v.chunks + c) * H + h) * P * N;  // [P][N]
  const float* dS = v.dstate + item * P * N;                              // [P][N]

  // The chunk's vectors, and ⟨dS, S⟩ (both are zero at the first chunk and at the last).
  for (int j = MSSM_RANK; j < Qp; j += MSSM_STRIDE) {
    cum[j] = v.cum[item * Qp + j];
    dtp[j] = v.dtp[item * Qp + j];
    slope[j] = v.slope[item * Qp + j];
  }
  if (MSSM_RANK == 0) red[0] = red[1] = 0.0;
  MSSM_SYNC();
  for (int j = MSSM_RANK; j < Qp; j += MSSM_STRIDE) {
    ecs[j] = j < len ? expf((float)cum[j]) : 0.0f;
    w[j] = j < len ? expf((float)(cum[len - 1] - cum[j])) : 0.0f;
  }
  if (!first && !last) {
    double part = 0;
    for (int64_t e = MSSM_RANK; e < P * N; e += MSSM_STRIDE) part += (double)S0[e] * (double)dS[e];
    MSSM_ATOMIC_ADD(&red[0], part);
  }

  // C, B, S and dS of the state columns [n0, n0 + nt) (zeros past N, len, P; S at the first chunk, dS
  // at the last).
  auto load_tiles = [&](int n0, int nt) {
    stage_tile(Ct, pC, ldN, Qp, nt, Cc, GN, len, N, n0, Unscaled{});
    stage_tile(Bt, pC, ldN, Qp, nt, Bc, GN, len, N, n0, Unscaled{});
    stage_tile(St, pS, ldN, Pp, nt, S0, N, first ? 0 : (int)P, N, n0, Unscaled{});
    stage_tile(dSt, pS, ldN, Pp, nt, dS, N, last ? 0 : (int)P, N, n0, Unscaled{});
  };

  // Phase A: F1 = C·Bᵀ, F2 = C·Sᵀ, F3 = B·dSᵀ, summed over the state tiles.
  const bool one_tile = Np <= Nt;
  for (int n0 = 0; n0 < Np; n0 += Nt) {
    const int nt = imin(Nt, Np - n0);
    load_tiles(n0, nt);
    MSSM_SYNC();
    block_matmul<T, false, true>(F1, ldF1, Ct, ldN, pC, Bt, ldN, pC, Qp, Qp, nt, n0 > 0);
    block_matmul<T, false, true>(F2, ldF2, Ct, ldN, pC, St, ldN, pS, Qp, Pp, nt, n0 > 0);
    block_matmul<T, false, true>(F3, ldF3, Bt, ldN, pC, dSt, ldN, pS, Qp, Pp, nt, n0 > 0);
  }

  // Phase B. xd and dy as operands; the state terms off and q, row by row, with F3's rows scaled by w
  // (dxd's end-state part) by the thread that read them; M from F1.
  stage_tile(X, pX, ldP, Qp, Pp, xc, HP, len, P, 0, [&](int j) { return dtp[j]; });
  stage_tile(DY, pX, ldP, Qp, Pp, dyc, HP, len, P, 0, Unscaled{});
  for (int i = MSSM_RANK; i < Qp; i += MSSM_STRIDE) {
    float o = 0.0f, qq = 0.0f;
    if (i < len)
      for (int p = 0; p < P; ++p) {
        o = fmaf(dyc[i * HP + p], F2[i * ldF2 + p], o);
        qq = fmaf(xc[i * HP + p], F3[i * ldF3 + p], qq);
      }
    off[i] = ecs[i] * o;
    q[i] = w[i] * dtp[i] * qq;
    for (int p = 0; p < Pp; ++p) F3[i * ldF3 + p] *= w[i];
  }
  for (int e = MSSM_RANK; e < Qp * Qp; e += MSSM_STRIDE) {
    const int i = e / Qp, j = e % Qp;
    const float m = j <= i && i < len ? expf((float)(cum[i] - cum[j])) * F1[i * ldF1 + j] : 0.0f;
    put(MW, pM, i * ldQ + j, m);
  }
  MSSM_SYNC();
  // dxd = diag(w)·B·dSᵀ + Mᵀ·dy (F3), then dM = dy·xdᵀ (F2: off has been read from it).
  block_matmul<T, true, false>(F3, ldF3, MW, ldQ, pM, DY, ldP, pX, Qp, Pp, Qp, true);
  block_matmul<T, false, true>(F2, ldF2, DY, ldP, pX, X, ldP, pX, Qp, Qp, Pp, false);

  // dx = dt ⊙ dxd + D·dy (along the channels, as stored), Σ dy·x for dD, and ddt's direct part x·dxd.
  const float Dh = v.D ? v.D[h] : 0.0f;
  double dD_part = 0;
  for (int e = MSSM_RANK; e < len * (int)P; e += MSSM_STRIDE) {
    const int j = e / (int)P, p = e % (int)P;
    const float dyv = dyc[j * HP + p];
    v.dx[((b * L + t0 + j) * H + h) * P + p] = fmaf(dtp[j], F3[j * ldF3 + p], Dh * dyv);
    dD_part += (double)dyv * (double)xc[j * HP + p];
  }
  if (v.D && v.dD) MSSM_ATOMIC_ADD(&red[1], dD_part);
  for (int j = MSSM_RANK; j < len; j += MSSM_STRIDE) {
    float sum = 0.0f;
    for (int p = 0; p < P; ++p) sum = fmaf(xc[j * HP + p], F3[j * ldF3 + p], sum);
    ddtx[j] = sum;
  }
  // Row sums (entries r < Qp) and column sums (r ≥ Qp) of W = dM ∘ Lm ∘ C·Bᵀ below the diagonal (the
  // diagonal's two terms cancel); then MW = dCB = dM ∘ Lm on and below it.
  for (int r = MSSM_RANK; r < 2 * Qp; r += MSSM_STRIDE) {
    float sum = 0.0f;
    if (r < Qp) {
      const int i = r;
      if (i < len)
        for (int j = 0; j < i; ++j) sum += F2[i * ldF2 + j] * expf((float)(cum[i] - cum[j])) * F1[i * ldF1 + j];
      rowsum[i] = sum;
    } else {
      const int j = r - Qp;
      for (int i = j + 1; i < len; ++i) sum += F2[i * ldF2 + j] * expf((float)(cum[i] - cum[j])) * F1[i * ldF1 + j];
      colsum[j] = sum;
    }
  }
  for (int e = MSSM_RANK; e < Qp * Qp; e += MSSM_STRIDE) {
    const int i = e / Qp, j = e % Qp;
    const float t = j <= i && i < len ? F2[i * ldF2 + j] * expf((float)(cum[i] - cum[j])) : 0.0f;
    put(MW, pM, i * ldQ + j, t);
  }
  MSSM_SYNC();

  // da, then ddt, dA and dt_bias: one thread walks the chunk's tokens in double, as the CPU does (the
  // sums of q before each token first, so that nothing is a difference of large sums).
  if (MSSM_RANK == 0) {
    double before = 0;
    for (int k = 0; k < len; ++k) {
      qb[k] = before;
      before += (double)q[k];
    }
    const double E = !first && !last ? (double)ecs[len - 1] * red[0] : 0.0;
    const double A = v.A[h];
    double after = 0, dA_sum = 0, bias_sum = 0;
    for (int k = len - 1; k >= 0; --k) {
      after += (double)off[k] + (double)rowsum[k] - (double)colsum[k];
      const double da = after + E + qb[k];
      const float raw = (float)((A * da + (double)ddtx[k]) * (double)slope[k]);
      v.ddt[(b * L + t0 + k) * H + h] = raw;
      bias_sum += (double)raw;
      dA_sum += (double)dtp[k] * da;
    }
    MSSM_ATOMIC_ADD(v.dA + h, (float)dA_sum);
    if (v.dt_bias && v.ddt_bias) MSSM_ATOMIC_ADD(v.ddt_bias + h, (float)bias_sum);
    if (v.D && v.dD) MSSM_ATOMIC_ADD(v.dD + h, (float)red[1]);
  }

  // Phase C: w ⊙ xd and ecs ⊙ dy replace xd and dy (last read by the product above, before its
  // barrier); then per state tile dC = dCB·B + (ecs ⊙ dy)·S into F1 and dB = dCBᵀ·C + (w ⊙ xd)·dS into
  // F2, added to the outputs.
  stage_tile(X, pX, ldP, Qp, Pp, xc, HP, len, P, 0, [&](int j) { return w[j] * dtp[j]; });
  stage_tile(DY, pX, ldP, Qp, Pp, dyc, HP, len, P, 0, [&](int i) { return ecs[i]; });
  for (int n0 = 0; n0 < Np; n0 += Nt) {
    const int nt = imin(Nt, Np - n0);
    if (!one_tile) load_tiles(n0, nt);
    MSSM_SYNC();
    block_matmul<T, false, false>(F1, ldF1, MW, ldQ, pM, Bt, ldN, pC, Qp, nt, Qp, false);
    block_matmul<T, false, false>(F1, ldF1, DY, ldP, pX, St, ldN, pS, Qp, nt, Pp, true);
    block_matmul<T, true, false>(F2, ldF2, MW, ldQ, pM, Ct, ldN, pC, Qp, nt, Qp, false);
    block_matmul<T, false, false>(F2, ldF2, X, ldP, pX, dSt, ldN, pS, Qp, nt, Pp, true);
    for (int e = MSSM_RANK; e < len * nt; e += MSSM_STRIDE) {
      const int i = e / nt, n = e % nt;
      if (n0 + n < N) {
        const int64_t at = (b * L + t0 + i) * GN + g * N + n0 + n;
        MSSM_ATOMIC_ADD(v.dC + at, F1[i * ldF1 + n]);
        MSSM_ATOMIC_ADD(v.dB + at, F2[i * ldF2 + n]);
      }
    }
    // The next tile's staging writes only the operand tiles, free since the last product's barrier;
    // F1 and F2 are written again only after the next barrier.
  }
}

}  // namespace mssm::cuda::ssd_backward
