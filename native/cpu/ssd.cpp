// Mamba-2 state-space duality (SSD): the chunked algorithm for whole sequences (prefill) and the
// one-token recurrence (decode).
//
// Glossary (sizes as in kernels.h):
//   b  batch       L  length (tokens)     H  heads       P  head_dim      N  state
//   G  groups: head h reads B and C of group g(h) = h / (H/G)             Q  chunk_size
//   c  chunk       i, j  tokens inside a chunk (i: output, j: input, j ≤ i)
//   dt'  processed step: clamp(softplus(dt + dt_bias), dt_min, dt_max)
//   a_t = dt'_t·A[h] ≤ 0, the log of the decay at token t
//
// The recurrence (kernels.h):  s_t = exp(a_t)·s_{t-1} + dt'_t·x_t ⊗ B_t,  y_t = s_t·C_t + D·x_t.
// The chunked form (Mamba-2 paper, "SSD algorithm"), with cum[i] = Σ_{k≤i} a_k inside one chunk:
//   (1) segment sums  Lseg[i,j] = exp(cum[i] - cum[j]) for j ≤ i (differences are ≤ 0: no overflow)
//   (2) Y_diag   = (Lseg ⊙ C·Bᵀ) · (dt' ⊙ x)
//   (3) S_chunk  = Σ_j exp(cum[last] - cum[j])·dt'_j·x_j ⊗ B_j
//   (4) S_c      = exp(cum[last])·S_{c-1} + S_chunk,   S_{-1} = state_in
//   (5) Y_off[i] = exp(cum[i])·C_i·S_{c-1}ᵀ;   y = (Y_diag + Y_off + D·x)·silu(z)
// Every step is a small fp32 matmul (small_matmul below). Inside the kernel the states are held
// transposed, [N, P], so that (3) and (5) are plain row-major products.
//
// Work is split into stages, each a parallel_for: (A) C·Bᵀ per (b, chunk, group), shared by the
// group's heads; (B) steps 1-3 per (b, head, chunk); (C) the recurrence 4 per (b, head), the only
// sequential part, elementwise over the states; (D) step 5 per (b, head, chunk). The sequence is
// processed in windows of chunks so the per-chunk states (b·H·window·N·P floats) stay bounded.
#include "level.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define MSSM_SSD_VECTOR 1
#else
#define MSSM_SSD_VECTOR 0
#endif

#include "../core/threadpool.h"
#include "simd.h"

namespace mssm::cpu::MSSM_LEVEL {
namespace {

// A thread takes at least this many multiply-adds of work, so tiny problems stay on one thread.
constexpr int64_t kMinWorkPerThread = 1 << 15;
// Upper bound on the per-chunk states kept for one window of chunks (floats; 4 MiB). A window of a
// single chunk still gives batch·heads independent items per stage.
constexpr int64_t kWindowStateFloats = int64_t(1) << 20;

inline int64_t min_items(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, work_per_item));
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "mamba-ssm: %s\n", what);
  std::abort();
}

using namespace simd;  // vec, vexp (about 1 ulp), tail loads and stores

// v[k] = exp(v[k]) for k < n.
void exp_inplace(float* v, int64_t n) {
  int64_t k = 0;
#if MSSM_SSD_VECTOR
  for (; k + kWidth <= n; k += kWidth) vstore(v + k, vexp(vload(v + k)));
  if (k < n) {
    const mask m = tail_mask(n - k);
    vstore_tail(v + k, vexp(vload_tail(v + k, m)), m);
    return;
  }
#endif
  for (; k < n; ++k) v[k] = std::exp(v[k]);
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// Which part of a product small_matmul may skip, for the causal (j ≤ i) products of a chunk:
//   lower_k:    row i reads a[i, k] only for k ≤ i (the caller stores zeros above the diagonal of
//               a up to the next multiple of kRows, or everywhere above it);
//   lower_cols: only columns j ≤ i of the output are needed (others may hold anything).
enum class Causal { none, lower_k, lower_cols };
constexpr int64_t kRows = 4;

#if MSSM_SSD_VECTOR
// One register tile: R rows × V vectors of out; the last vector is partial when Tail.
template <int R, int V, bool Tail>
void tile(const float* a, int64_t lda, const float* b, int64_t ldb, float* out, int64_t ldo, int64_t K,
          const float* row_scale, bool accumulate, mask tail) {
  vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    vec bv[V];
    for (int v = 0; v < V; ++v) bv[v] = (Tail && v == V - 1) ? vload_tail(bk + v * kWidth, tail) : vload(bk + v * kWidth);
    for (int r = 0; r < R; ++r) {
      const vec av = vset(a[r * lda + k]);
      for (int v = 0; v < V; ++v) acc[r][v] = vfma(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      vec result = row_scale ? vmul(acc[r][v], vset(row_scale[r])) : acc[r][v];
      float* o = out + r * ldo + v * kWidth;
      const bool partial = Tail && v == V - 1;
      if (accumulate) result = vadd(result, partial ? vload_tail(o, tail) : vload(o));
      if (partial)
        vstore_tail(o, result, tail);
      else
        vstore(o, result);
    }
  }
}

template <int R>
void tile_rows(int64_t V, bool partial, const float* a, int64_t lda, const float* b, int64_t ldb, float* out,
               int64_t ldo, int64_t K, const float* row_scale, bool accumulate, mask tail) {
  if (V == 2) {
    if (partial)
      tile<R, 2, true>(a, lda, b, ldb, out, ldo, K, row_scale, accumulate, tail);
    else
      tile<R, 2, false>(a, lda, b, ldb, out, ldo, K, row_scale, accumulate, tail);
  } else {
    if (partial)
      tile<R, 1, true>(a, lda, b, ldb, out, ldo, K, row_scale, accumulate, tail);
    else
      tile<R, 1, false>(a, lda, b, ldb, out, ldo, K, row_scale, accumulate, tail);
  }
}
#endif

// out[i, j] = row_scale[i] · Σ_k a[i, k]·b[k, j]   (+ out[i, j] when accumulate; row_scale may be
// null), i < M, j < cols, k < K, all row-major with leading dimensions lda, ldb, ldo; fp32
// accumulation. The vector path keeps a kRows × 2-vector tile of out in registers and walks k,
// broadcasting a and streaming rows of b.
void small_matmul(int64_t M, int64_t cols, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                  float* out, int64_t ldo, const float* row_scale, bool accumulate, Causal causal) {
#if MSSM_SSD_VECTOR
  for (int64_t j0 = 0; j0 < cols; j0 += 2 * kWidth) {
    const int64_t width = std::min(2 * kWidth, cols - j0);
    const int64_t V = width > kWidth ? 2 : 1;
    const int64_t last = width - (V - 1) * kWidth;
    const bool partial = last < kWidth;
    const mask tail = tail_mask(last);
    // Rows above j0 need none of these columns.
    for (int64_t i0 = causal == Causal::lower_cols ? j0 : 0; i0 < M; i0 += kRows) {
      const int64_t R = std::min(kRows, M - i0);
      const int64_t k_end = causal == Causal::lower_k ? std::min(K, i0 + R) : K;
      const float* ai = a + i0 * lda;
      float* oi = out + i0 * ldo + j0;
      const float* si = row_scale ? row_scale + i0 : nullptr;
      switch (R) {
        case 4: tile_rows<4>(V, partial, ai, lda, b + j0, ldb, oi, ldo, k_end, si, accumulate, tail); break;
        case 3: tile_rows<3>(V, partial, ai, lda, b + j0, ldb, oi, ldo, k_end, si, accumulate, tail); break;
        case 2: tile_rows<2>(V, partial, ai, lda, b + j0, ldb, oi, ldo, k_end, si, accumulate, tail); break;
        default: tile_rows<1>(V, partial, ai, lda, b + j0, ldb, oi, ldo, k_end, si, accumulate, tail); break;
      }
    }
  }
#else
  thread_local std::vector<float> row;
  if ((int64_t)row.size() < cols) row.resize(cols);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t k_end = causal == Causal::lower_k ? std::min(K, i + 1) : K;
    const int64_t j_end = causal == Causal::lower_cols ? std::min(cols, i + 1) : cols;
    float* acc = row.data();
    for (int64_t j = 0; j < j_end; ++j) acc[j] = 0.0f;
    for (int64_t k = 0; k < k_end; ++k) {
      const float aik = a[i * lda + k];
      const float* bk = b + k * ldb;
      for (int64_t j = 0; j < j_end; ++j) acc[j] += aik * bk[j];
    }
    const float scale = row_scale ? row_scale[i] : 1.0f;
    float* o = out + i * ldo;
    if (accumulate)
      for (int64_t j = 0; j < j_end; ++j) o[j] += scale * acc[j];
    else
      for (int64_t j = 0; j < j_end; ++j) o[j] = scale * acc[j];
  }
#endif
}

inline float process_dt(const SsdArgs& args, float raw, int64_t h) {
  float v = raw + (args.dt_bias ? args.dt_bias[h] : 0.0f);
  if (args.dt_softplus) v = v > 20.0f ? v : std::log1p(std::exp(v));
  return std::min(std::max(v, args.dt_min), args.dt_max);
}

// y[p] = (y[p] + D·x[p]) · silu(z[p]) over one row of P; gate is scratch of P floats.
void finish_row(float* y, const float* x, const float* z, float D, bool has_D, int64_t P, float* gate) {
  if (has_D)
    for (int64_t p = 0; p < P; ++p) y[p] += D * x[p];
  if (!z) return;
  for (int64_t p = 0; p < P; ++p) gate[p] = -z[p];
  exp_inplace(gate, P);
  for (int64_t p = 0; p < P; ++p) y[p] *= z[p] / (1.0f + gate[p]);
}

// Per-thread scratch of stage B, reused across calls.
struct ChunkScratch {
  std::vector<double> cum;   // [Q] cumulative a inside the chunk (double: the differences stay exact)
  std::vector<float> lseg;   // [Q, Q] (Lseg ⊙ C·Bᵀ), zero above the diagonal
  std::vector<float> xdt;    // [Q, P] dt'_j·x_j, then scaled by the decay to the chunk end
  std::vector<float> gate;   // [P]
};
ChunkScratch& chunk_scratch() {
  static thread_local ChunkScratch scratch;
  return scratch;
}

template <typename T>
void grow(std::vector<T>& v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize(n);
}

}  // namespace

void ssd_chunked(const SsdArgs& args) {
  const int64_t batch = args.batch, L = args.length, H = args.heads, P = args.head_dim, N = args.state;
  const int64_t G = args.groups;
  if (G <= 0 || H % G != 0) fail("ssd_chunked: heads must be a multiple of groups");
  if (args.chunk_size <= 0) fail("ssd_chunked: chunk_size must be positive");
  if (batch <= 0 || H <= 0 || P <= 0 || N <= 0) return;
  const int64_t heads_per_group = H / G, state_size = N * P;
  const float* const state_in = args.state_in;
  float* const state_out = args.state_out;

  if (L <= 0) {  // no tokens: the state passes through unchanged
    if (state_out && state_out != state_in) {
      const size_t bytes = (size_t)(batch * H * state_size) * sizeof(float);
      if (state_in)
        std::memcpy(state_out, state_in, bytes);
      else
        std::memset(state_out, 0, bytes);
    }
    return;
  }

  const int64_t Q = std::min(args.chunk_size, L);
  const int64_t chunks = (L + Q - 1) / Q;
  const int64_t window = std::clamp<int64_t>(kWindowStateFloats / (batch * H * state_size), 1, chunks);
  const int64_t row_stride = H * P;  // between tokens in x, z and y
  const int64_t bc_stride = G * N;   // between tokens in B and C

  // Window buffers; [.., window, ..] indexes the chunk within the window.
  std::unique_ptr<float[]> Bt(new float[batch * window * G * N * Q]);        // [b, window, G, N, Q] Bᵀ
  std::unique_ptr<float[]> CB(new float[batch * window * G * Q * Q]);        // [b, window, G, Q, Q]
  std::unique_ptr<float[]> states(new float[batch * H * window * state_size]);  // [b, H, window, N, P]
  std::unique_ptr<float[]> decay(new float[batch * H * window * Q]);         // [b, H, window, Q] exp(cum[i])
  std::unique_ptr<float[]> running(new float[batch * H * state_size]);       // [b, H, N, P] S before the window

  parallel_for(batch * H, min_items(state_size), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      float* run = running.get() + bh * state_size;
      if (!state_in) {
        std::memset(run, 0, (size_t)state_size * sizeof(float));
        continue;
      }
      const float* s = state_in + bh * state_size;
      for (int64_t p = 0; p < P; ++p)
        for (int64_t n = 0; n < N; ++n) run[n * P + p] = s[p * N + n];
    }
  });
  bool running_is_zero = !state_in;

  for (int64_t c0 = 0; c0 < chunks; c0 += window) {
    const int64_t in_window = std::min(window, chunks - c0);
    auto chunk_start = [&](int64_t w) { return (c0 + w) * Q; };
    auto chunk_length = [&](int64_t w) { return std::min(Q, L - (c0 + w) * Q); };

    // Stage A: Bᵀ and C·Bᵀ (lower triangle) once per (b, chunk, group).
    parallel_for(batch * in_window * G, min_items(Q * Q * N / 2), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / (in_window * G), w = item / G % in_window, g = item % G;
        const int64_t t0 = chunk_start(w), n_tok = chunk_length(w);
        const float* Bc = args.B + ((b * L + t0) * G + g) * N;
        const float* Cc = args.C + ((b * L + t0) * G + g) * N;
        float* bt = Bt.get() + ((b * window + w) * G + g) * N * Q;
        float* cb = CB.get() + ((b * window + w) * G + g) * Q * Q;
        for (int64_t j = 0; j < n_tok; ++j)
          for (int64_t n = 0; n < N; ++n) bt[n * Q + j] = Bc[j * bc_stride + n];
        small_matmul(n_tok, n_tok, N, Cc, bc_stride, bt, Q, cb, Q, nullptr, false, Causal::lower_cols);
      }
    });

    // Stage B: steps 1-3 per (b, head, chunk): Y_diag into y, S_chunk into states, exp(cum) into decay.
    parallel_for(batch * H * in_window, min_items(Q * (Q * P / 2 + N * P)), [&](int64_t begin, int64_t end) {
      ChunkScratch& scratch = chunk_scratch();
      grow(scratch.cum, Q);
      grow(scratch.lseg, Q * Q);
      grow(scratch.xdt, Q * P);
      double* cum = scratch.cum.data();
      float* lseg = scratch.lseg.data();
      float* xdt = scratch.xdt.data();
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / (H * in_window), h = item / in_window % H, w = item % in_window;
        const int64_t g = h / heads_per_group;
        const int64_t t0 = chunk_start(w), n_tok = chunk_length(w);
        const float* dt = args.dt + (b * L + t0) * H + h;
        const float* x = args.x + ((b * L + t0) * H + h) * P;
        float* y = args.y + ((b * L + t0) * H + h) * P;
        const float* bt = Bt.get() + ((b * window + w) * G + g) * N * Q;
        const float* cb = CB.get() + ((b * window + w) * G + g) * Q * Q;
        float* st = states.get() + ((b * H + h) * window + w) * state_size;
        float* dec = decay.get() + ((b * H + h) * window + w) * Q;
        const double A = args.A[h];

        double sum = 0.0;
        for (int64_t i = 0; i < n_tok; ++i) {
          const float dtp = process_dt(args, dt[i * H], h);
          for (int64_t p = 0; p < P; ++p) xdt[i * P + p] = dtp * x[i * row_stride + p];
          sum += dtp * A;
          cum[i] = sum;
          dec[i] = (float)sum;
        }
        exp_inplace(dec, n_tok);

        // (1)+(2): row i of Lseg ⊙ C·Bᵀ, then Y_diag = that · (dt' ⊙ x).
        for (int64_t i = 0; i < n_tok; ++i) {
          float* row = lseg + i * Q;
          for (int64_t j = 0; j <= i; ++j) row[j] = (float)(cum[i] - cum[j]);
          exp_inplace(row, i + 1);
          const float* cbi = cb + i * Q;
          for (int64_t j = 0; j <= i; ++j) row[j] *= cbi[j];
          for (int64_t j = i + 1; j < n_tok; ++j) row[j] = 0.0f;
        }
        small_matmul(n_tok, P, n_tok, lseg, Q, xdt, P, y, row_stride, nullptr, false, Causal::lower_k);

        // (3): weight each token by its decay to the chunk end; S_chunkᵀ[n, p] = Σ_j Bᵀ[n, j]·xdt[j, p].
        float* to_end = lseg;  // row 0 of lseg is free again
        for (int64_t j = 0; j < n_tok; ++j) to_end[j] = (float)(cum[n_tok - 1] - cum[j]);
        exp_inplace(to_end, n_tok);
        for (int64_t j = 0; j < n_tok; ++j)
          for (int64_t p = 0; p < P; ++p) xdt[j * P + p] *= to_end[j];
        small_matmul(N, P, n_tok, bt, Q, xdt, P, st, P, nullptr, false, Causal::none);
      }
    });

    // Stage C, step 4: states[w] becomes the state entering chunk w; running moves to the window end.
    parallel_for(batch * H, min_items(in_window * state_size), [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        float* run = running.get() + bh * state_size;
        for (int64_t w = 0; w < in_window; ++w) {
          float* st = states.get() + (bh * window + w) * state_size;
          const float chunk_decay = decay[(bh * window + w) * Q + chunk_length(w) - 1];
          for (int64_t e = 0; e < state_size; ++e) {
            const float entering = run[e];
            run[e] = chunk_decay * entering + st[e];
            st[e] = entering;
          }
        }
      }
    });

    // Stage D, step 5: y += exp(cum[i])·C_i·S_enteringᵀ, then D·x and the gate.
    const bool first_is_zero = running_is_zero;
    parallel_for(batch * H * in_window, min_items(Q * N * P), [&](int64_t begin, int64_t end) {
      ChunkScratch& scratch = chunk_scratch();
      grow(scratch.gate, P);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / (H * in_window), h = item / in_window % H, w = item % in_window;
        const int64_t g = h / heads_per_group;
        const int64_t t0 = chunk_start(w), n_tok = chunk_length(w);
        const int64_t offset = ((b * L + t0) * H + h) * P;
        float* y = args.y + offset;
        if (!(w == 0 && first_is_zero)) {
          const float* Cc = args.C + ((b * L + t0) * G + g) * N;
          const float* st = states.get() + ((b * H + h) * window + w) * state_size;
          const float* dec = decay.get() + ((b * H + h) * window + w) * Q;
          small_matmul(n_tok, P, N, Cc, bc_stride, st, P, y, row_stride, dec, true, Causal::none);
        }
        if (args.D || args.z) {
          const float D = args.D ? args.D[h] : 0.0f;
          for (int64_t i = 0; i < n_tok; ++i)
            finish_row(y + i * row_stride, args.x + offset + i * row_stride,
                       args.z ? args.z + offset + i * row_stride : nullptr, D, args.D != nullptr, P,
                       scratch.gate.data());
        }
      }
    });
    running_is_zero = false;
  }

  if (state_out) {
    parallel_for(batch * H, min_items(state_size), [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const float* run = running.get() + bh * state_size;
        float* s = state_out + bh * state_size;
        for (int64_t p = 0; p < P; ++p)
          for (int64_t n = 0; n < N; ++n) s[p * N + n] = run[n * P + p];
      }
    });
  }
}

void ssd_step(const SsdArgs& args) {
  if (args.length != 1) fail("ssd_step: length must be 1");
  if (!args.state_out) fail("ssd_step: state_out must be set");
  const int64_t batch = args.batch, H = args.heads, P = args.head_dim, N = args.state, G = args.groups;
  if (G <= 0 || H % G != 0) fail("ssd_step: heads must be a multiple of groups");
  if (batch <= 0 || H <= 0 || P <= 0 || N <= 0) return;
  const int64_t heads_per_group = H / G;

  parallel_for(batch * H, min_items(P * N), [&](int64_t begin, int64_t end) {
    ChunkScratch& scratch = chunk_scratch();
    grow(scratch.gate, P);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / H, h = item % H, g = h / heads_per_group;
      const float dtp = process_dt(args, args.dt[item], h);
      const float decay = std::exp(dtp * args.A[h]);
      const float* Bv = args.B + (b * G + g) * N;
      const float* Cv = args.C + (b * G + g) * N;
      const float* x = args.x + item * P;
      float* y = args.y + item * P;
      for (int64_t p = 0; p < P; ++p) {
        // s[p, :] = decay·s[p, :] + dt'·x[p]·B;  y[p] = s[p, :]·C
        const float* in = args.state_in ? args.state_in + (item * P + p) * N : nullptr;
        float* out = args.state_out + (item * P + p) * N;
        const float xdt = dtp * x[p];
        int64_t n = 0;
        float dot = 0.0f;
#if MSSM_SSD_VECTOR
        const vec vdecay = vset(decay), vxdt = vset(xdt);
        vec vdot = vzero();
        for (; n + kWidth <= N; n += kWidth) {
          const vec prev = in ? vmul(vdecay, vload(in + n)) : vzero();
          const vec s = vfma(vxdt, vload(Bv + n), prev);
          vstore(out + n, s);
          vdot = vfma(s, vload(Cv + n), vdot);
        }
        dot = vsum(vdot);
#endif
        for (; n < N; ++n) {
          const float s = (in ? decay * in[n] : 0.0f) + xdt * Bv[n];
          out[n] = s;
          dot += s * Cv[n];
        }
        y[p] = dot;
      }
      finish_row(y, x, args.z ? args.z + item * P : nullptr, args.D ? args.D[h] : 0.0f, args.D != nullptr, P,
                 scratch.gate.data());
    }
  });
}

}  // namespace mssm::cpu::MSSM_LEVEL
