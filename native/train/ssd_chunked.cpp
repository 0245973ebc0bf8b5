// Forward and backward of the chunked SSD (see ssd_chunked.h for the equations and the interface).
//
// Glossary as in ssd_chunked.h, and inside one chunk of len ≤ Q tokens for one batch b and head h:
//   dt_j   the processed step, slope_j = d dt_j / d dt_raw_j (0 where clamped)
//   cs_i   = Σ_{k≤i} dt_k·A  (≤ 0; kept in double so that differences of it stay exact)
//   ecs_i  = exp(cs_i) (decay from the chunk's start),  w_j = exp(cs_last − cs_j) (decay to its end)
//   CB     = C·Bᵀ [Q, Q], one per (chunk, group);  Lm[i,j] = exp(cs_i − cs_j), j ≤ i;  M = Lm ∘ CB
//   xd     = dt ⊙ x [Q, P];  S = the state at the chunk's start [P, N] (`boundary`)
//   dS     = the adjoint of the state at the chunk's end [P, N] (carried from the chunk after)
//
// Forward, per chunk (in order) and head, with the head's running state St = Sᵀ [N, P]:
//   y   = M·xd + diag(ecs)·(C·St) + D·x            two products, P columns
//   St ← exp(cs_last)·St + Bᵀ·(diag(w)·xd)        one product; Sᵀ is written to `boundary` at each
//                                                   chunk's start, and nothing else is kept.
// Backward, per chunk (last to first) and head: nothing but the chunk's start state is read back;
// CB, Lm, M and xd are recomputed, and with dye = diag(ecs)·dy:
//   dM     = dy·xdᵀ (lower triangle)          dCB += dM ∘ Lm  (summed over the group's heads)
//   dCoff  = dye·S               [Q, N]       dBend = diag(w)·xd·dS   [Q, N]
//   dxd    = diag(w)·B·dSᵀ + Mᵀ·dy            dx = dt ⊙ dxd + D·dy
//   dS    ← exp(cs_last)·dS + dyeᵀ·C          the adjoint carried to the chunk before
// and per group: dC = dCB·B + Σ_h dCoff,  dB = dCBᵀ·C + Σ_h dBend. The adjoint of cs, turned into
// that of a_k = dt_k·A (a_k enters every cs_i with i ≥ k), is summed without the cancellations of a
// reverse cumulative sum:
//   da_k = Σ_{i≥k} (off_i + Σ_{j<i} W[i,j] − Σ_{m>i} W[m,i]) + E + Σ_{j<k} q_j
// with W = dM ∘ M (the diagonal, whose two terms cancel exactly, left out), off_i = C_i·dCoff_i
// (the start-state term), q_j = B_j·dBend_j and E = exp(cs_last)·⟨dS, S⟩ (the end-state terms);
// then ddt_raw = (A·da + x·dxd)·slope, dA += Σ dt·da.
//
// Cost per token and head: forward P·(2N + Q/2) multiply-adds, backward P·(4N + Q), plus per token
// and block of heads Q·N/2 for C·Bᵀ (forward and backward) and Q·N for dB, dC. The recurrence costs
// O(P·N) per token too, but with loads and stores of the state around every multiply-add; the chunked
// form wins by running its multiply-adds as register-blocked products.
//
// Work split: a task is (batch, group, block of the group's heads, see kMinTasks); it computes
// C·Bᵀ once for its heads. The forward walks all chunks in one task; the backward runs the chunks
// last to first, one parallel pass each (the carried dS of a head belongs to one task), and, when a
// group's heads span several blocks, sums the blocks' dB / dC in block order afterwards. dA, dD and
// dt_bias are summed per (batch, head) over the chunks, then over batches in order. The split depends
// only on the shapes, so every output is bit-identical at any thread count.
//
// Products: gemm() below walks blocks of R rows × V SIMD vectors of columns with the R·V
// accumulators in registers (up to 24 of AVX-512's 32 registers, 12 of AVX2's or SSE's 16), and
// writes each block through an epilogue (row scales, scaled addends) straight to its destination. The
// left operand is read in place, row-major or transposed, one broadcast per (row, k); the right
// operand's rows are read as whole vectors (the inputs' rows are copied to scratch rows padded to
// whole vectors), and every scratch operand has kMaxRows spare rows, so a block's rows and columns
// past the end read memory that exists; what they compute is dropped.
//
// Memory: nothing per token beyond the chunk in hand (see ssd_backward_scratch_bytes in ssd_chunked.h). The
// scratch is kept by the calling thread from call to call: fresh pages cost a fault per 4 KiB on every
// call, several ms per backward on this project's machines. So its contents are whatever the last call
// left, and no result may depend on them: every value read is written first by this call, except in
// the padding and spare rows above, and never as 0·stale (which is NaN when stale is).
#include "ops_table.h"

#ifndef MSSM_LEVEL
#error "MSSM_LEVEL must be defined (baseline, avx2, avx512 or avx512bf16) when compiling a kernel source"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "../core/exp_poly.h"
#include "../core/threadpool.h"
#include "../cpu/simd.h"
#include "dt_rule.h"

namespace mssm::train::MSSM_LEVEL {
namespace {

// ---- SIMD vectors of T ------------------------------------------------------------------------------

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64, kAccumulators = 24, kMaxVectors = 4;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32, kAccumulators = 12, kMaxVectors = 3;
#else
constexpr int kVectorBytes = 16, kAccumulators = 12, kMaxVectors = 3;
#endif
constexpr int kMaxRows = 8;
// Rows of a product block whose widest column block has `vectors` vectors.
constexpr int rows_for(int vectors) { return kAccumulators / vectors < kMaxRows ? kAccumulators / vectors : kMaxRows; }

template <typename T>
struct VectorOf {
  typedef T type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using Vec = typename VectorOf<T>::type;
template <typename T>
constexpr int64_t kWidth = kVectorBytes / (int64_t)sizeof(T);

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof v);
}
// (by intrinsic: Vec<T>{} + s adds a zero first, and a lane loop became a masked broadcast per lane)
template <typename T>
inline Vec<T> splat(T s) {
  constexpr bool f = std::is_same_v<T, float>;
#if defined(__AVX512F__)
  if constexpr (f) return (Vec<T>)_mm512_set1_ps(s); else return (Vec<T>)_mm512_set1_pd(s);
#elif defined(__AVX__)
  if constexpr (f) return (Vec<T>)_mm256_set1_ps(s); else return (Vec<T>)_mm256_set1_pd(s);
#elif defined(__SSE2__)
  if constexpr (f) return (Vec<T>)_mm_set1_ps(s); else return (Vec<T>)_mm_set1_pd(s);
#else
  (void)f;
  return Vec<T>{} + s;
#endif
}
// a·b + c, fused where the level has FMA (the compiler is not asked to contract a·b + c itself).
template <typename V>
inline V fmadd(const V& a, const V& b, const V& c) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<V, Vec<float>>)
    return (V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
  else
    return (V)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif defined(__FMA__)
  if constexpr (std::is_same_v<V, Vec<float>>)
    return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
  else
    return (V)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}
// The lanes summed as a fixed tree (lane j with j + W/2, then j + W/4, ...).
template <typename V>
inline auto lane_sum(const V& v) {
  using T = std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>;
#if defined(__AVX512F__)
  // (the same tree, as shuffles)
  if constexpr (std::is_same_v<T, float>)
    return _mm512_reduce_add_ps((__m512)v);
  else
    return _mm512_reduce_add_pd((__m512d)v);
#endif
  constexpr int64_t W = kWidth<T>;
  T s[W];
  std::memcpy(s, &v, sizeof v);
  for (int64_t h = W / 2; h >= 1; h /= 2)
    for (int64_t j = 0; j < h; ++j) s[j] += s[j + h];
  return s[0];
}
// Σ a[i]·b[i] and Σ a[i] over n values, in vector lanes, then the lanes, then the tail.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  Vec<T> acc{};
  int64_t i = 0;
  for (; i + kWidth<T> <= n; i += kWidth<T>) acc = fmadd(load<T>(a + i), load<T>(b + i), acc);
  T s = lane_sum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
template <typename T>
inline T sum(const T* a, int64_t n) {
  Vec<T> acc{};
  int64_t i = 0;
  for (; i + kWidth<T> <= n; i += kWidth<T>) acc += load<T>(a + i);
  T s = lane_sum(acc);
  for (; i < n; ++i) s += a[i];
  return s;
}

// Loops over rows, their pointers declared not to overlap so that they vectorise without run-time checks.
// o = a·x
template <typename T>
inline void row_scale(T* __restrict o, T a, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = a * x[i];
}
// o = a·x + b·y
template <typename T>
inline void row_combine(T* __restrict o, T a, const T* __restrict x, T b, const T* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = a * x[i] + b * y[i];
}
// o += x
template <typename T>
inline void row_add(T* __restrict o, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] += x[i];
}

// Asks for `rows` rows of `bytes` bytes, stride values apart, to be brought into cache (the next head's
// rows of x and dy: 128 bytes every H·P values, a stride the hardware prefetchers do not follow).
template <typename T>
inline void prefetch_rows(const T* p, int64_t rows, int64_t stride, int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char*)(p + r * stride) + b);
}

// v[i] = exp(v[i]); for T = float the polynomial of core/exp_poly.h (about 2 ulp; the loop vectorises).
inline void exp_inplace(float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = exp_poly(v[i]);
}
inline void exp_inplace(double* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i]);
}

// dst[c·ld_dst + r] = src[r·ld_src + c] for r < rows, c < cols: floats on AVX-512 in 16 × 16 register
// blocks (native/cpu/simd.h), otherwise in 8 × 8 blocks.
template <typename T>
void transpose(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    cpu::MSSM_LEVEL::simd::transpose(src, ld_src, rows, cols, dst, ld_dst);
    return;
  }
#endif
  constexpr int64_t kBlock = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t c1 = std::min(cols, c0 + kBlock);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
  }
}

// ---- Register-blocked products -----------------------------------------------------------------------

// The first n lanes of a vector at p (n ≥ W: all of them), the others zero; and their store.
template <typename T>
inline Vec<T> load_n(const T* p, int64_t n) {
  if (n >= kWidth<T>) return load<T>(p);
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>)
    return (Vec<T>)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
  else
    return (Vec<T>)_mm512_maskz_loadu_pd((__mmask8)((1u << n) - 1), p);
#else
  Vec<T> v{};
  std::memcpy(&v, p, (size_t)n * sizeof(T));
  return v;
#endif
}
template <typename T>
inline void store_n(T* p, const Vec<T>& v, int64_t n) {
  if (n >= kWidth<T>) return store<T>(p, v);
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>)
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v);
  else
    _mm512_mask_storeu_pd(p, (__mmask8)((1u << n) - 1), (__m512d)v);
#else
  std::memcpy(p, &v, (size_t)n * sizeof(T));
#endif
}

// Where a product's results go: out[i][j] = row_scale[i]·acc[i][j] + Σ_q s_q(i)·addend_q[i][j], with
// s_q(i) = scale (· row_scale_q[i]); null pointers are left out. An addend may be out itself (each
// element is read before it is written).
template <typename T>
struct Addend {
  const T* p = nullptr;
  int64_t ld = 0;
  T scale = T(1);
  const T* row_scale = nullptr;
};
template <typename T>
struct Epilogue {
  T* out;
  int64_t ld;
  const T* row_scale;
  Addend<T> add[2];
  Epilogue(T* out_, int64_t ld_, const T* row_scale_ = nullptr) : out(out_), ld(ld_), row_scale(row_scale_) {}
};

// Rows i0 … i0 + nr − 1 (nr ≤ R) and columns j0 … j0 + width − 1 (width ≤ V·W) of a product:
// acc[r][c] = Σ_{k0≤k<k1} a(r, k) · b[k·ldb + c], a(r, k) = a[k·a_stride + r] (transposed) or
// a[r·a_stride + k], with the R·V accumulators in registers; then the epilogue, for the rows that
// exist. (All R rows are computed: a's spare rows must be readable.)
template <typename T, bool kTransposedA, int R, int V>
void tile(const T* a, int64_t a_stride, int64_t k0, int64_t k1, const T* b, int64_t ldb, const Epilogue<T>& e,
          int64_t i0, int64_t nr, int64_t j0, int64_t width) {
  constexpr int64_t W = kWidth<T>;
  Vec<T> acc[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < V; ++c) acc[r][c] = Vec<T>{};
  for (int64_t k = k0; k < k1; ++k) {
    const T* bk = b + k * ldb;
    Vec<T> bv[V];
#pragma GCC unroll 16
    for (int c = 0; c < V; ++c) bv[c] = load<T>(bk + c * W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const Vec<T> av = splat<T>(kTransposedA ? a[k * a_stride + r] : a[r * a_stride + k]);
#pragma GCC unroll 16
      for (int c = 0; c < V; ++c) acc[r][c] = fmadd(av, bv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (r >= nr) break;
    const int64_t i = i0 + r;
    const T rs = e.row_scale ? e.row_scale[i] : T(1);
    T s[2];
    for (int q = 0; q < 2; ++q) s[q] = e.add[q].row_scale ? e.add[q].scale * e.add[q].row_scale[i] : e.add[q].scale;
#pragma GCC unroll 16
    for (int c = 0; c < V; ++c) {
      const int64_t n = width - c * W, j = j0 + c * W;
      if (n <= 0) break;
      Vec<T> v = e.row_scale ? acc[r][c] * rs : acc[r][c];
      for (int q = 0; q < 2; ++q)
        if (e.add[q].p) v = fmadd(splat<T>(s[q]), load_n(e.add[q].p + i * e.add[q].ld + j, n), v);
      store_n(e.out + i * e.ld + j, v, n);
    }
  }
}

template <typename T, bool kTransposedA>
using TileFn = void (*)(const T*, int64_t, int64_t, int64_t, const T*, int64_t, const Epilogue<T>&, int64_t, int64_t,
                        int64_t, int64_t);

// The tile of V vectors in a product whose widest column block has Vm.
template <typename T, bool kTransposedA, int Vm>
TileFn<T, kTransposedA> tile_of(int v) {
  constexpr int R = rows_for(Vm);
  switch (v) {
    case 1: return &tile<T, kTransposedA, R, 1>;
    case 2: if constexpr (Vm >= 2) return &tile<T, kTransposedA, R, 2>; break;
    case 3: if constexpr (Vm >= 3) return &tile<T, kTransposedA, R, 3>; break;
    case 4: if constexpr (Vm >= 4) return &tile<T, kTransposedA, R, 4>; break;
    default: break;
  }
  return nullptr;
}
template <typename T, bool kTransposedA>
TileFn<T, kTransposedA> tile_of(int vm, int v) {
  switch (vm) {
    case 1: return tile_of<T, kTransposedA, 1>(v);
    case 2: return tile_of<T, kTransposedA, 2>(v);
    case 3: if constexpr (kMaxVectors >= 3) return tile_of<T, kTransposedA, 3>(v); break;
    case 4: if constexpr (kMaxVectors >= 4) return tile_of<T, kTransposedA, 4>(v); break;
    default: break;
  }
  return nullptr;
}

// Which part of a product a row block [i0, i0 + nr) computes: all of it; k < i0 + nr (A lower
// triangular); k ≥ i0 (A upper triangular); or only the columns < i0 + nr (the output's lower triangle).
enum class Span { all, k_through_block, k_from_block, columns_through_block };

// The rows × cols product of A (rows × K, read as in tile()) and b (K rows, ldb apart, each readable
// to a whole number of vectors past cols), through the epilogue e, block by block. The rows of A must
// be readable up to kMaxRows past `rows`.
template <bool kTransposedA, typename T>
void gemm(int64_t rows, int64_t cols, int64_t K, Span span, const T* a, int64_t a_stride, const T* b, int64_t ldb,
          const Epilogue<T>& e) {
  constexpr int64_t W = kWidth<T>;
  if (rows <= 0 || cols <= 0) return;
  const int vm = (int)std::min<int64_t>(kMaxVectors, (cols + W - 1) / W);
  const int R = rows_for(vm);
  for (int64_t i0 = 0; i0 < rows; i0 += R) {
    const int64_t nr = std::min<int64_t>(R, rows - i0);
    const int64_t k0 = span == Span::k_from_block ? std::min(i0, K) : 0;
    const int64_t k1 = span == Span::k_through_block ? std::min(K, i0 + nr) : K;
    const int64_t col_end = span == Span::columns_through_block ? std::min(cols, i0 + nr) : cols;
    const T* ai = kTransposedA ? a + i0 : a + i0 * a_stride;
    for (int64_t j0 = 0; j0 < col_end; j0 += vm * W) {
      const int v = (int)std::min<int64_t>(vm, (col_end - j0 + W - 1) / W);
      tile_of<T, kTransposedA>(vm, v)(ai, a_stride, k0, std::max(k0, k1), b + j0, ldb, e, i0, nr, j0,
                                      std::min<int64_t>(v * W, cols - j0));
    }
  }
}

// The usual epilogues: a plain store; rows scaled; one addend.
template <typename T>
Epilogue<T> store_to(T* out, int64_t ld) {
  return {out, ld};
}
template <typename T>
Epilogue<T> store_scaled(T* out, int64_t ld, const T* row_scale) {
  return {out, ld, row_scale};
}
template <typename T>
Epilogue<T> store_added(T* out, int64_t ld, const T* base, int64_t ld_base, T base_scale) {
  Epilogue<T> e{out, ld};
  e.add[0] = {base, ld_base, base_scale};
  return e;
}

// ---- Shapes and scratch --------------------------------------------------------------------------------

// A group's heads are split into blocks, one task each, sharing C·Bᵀ and the products for dB and dC:
// as few blocks as give at least kMinTasks tasks in all (batch · groups · blocks), with at most
// kMaxHeadsPerTask heads in a block (the forward keeps their states). A function of the shapes alone.
constexpr int64_t kMinTasks = 4, kMaxHeadsPerTask = 16;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

void check_args(const SsdTrainArgs& a) {
  auto non_negative = [](const char* field, int64_t v) {
    if (v < 0) throw std::invalid_argument(std::string("ssd: ") + field + " must be >= 0, got " + std::to_string(v));
  };
  non_negative("batch", a.batch);
  non_negative("length", a.length);
  non_negative("heads", a.heads);
  non_negative("head_dim", a.head_dim);
  non_negative("state", a.state);
  if (a.groups < 1 || a.heads % a.groups != 0)
    throw std::invalid_argument("ssd: groups " + std::to_string(a.groups) + " does not divide heads " +
                                std::to_string(a.heads));
  if (a.chunk < 1) throw std::invalid_argument("ssd: chunk must be >= 1, got " + std::to_string(a.chunk));
}

struct Layout {
  int64_t batch, L, H, P, N, G, Q, chunks, Qc;  // Qc = min(chunk, length): the longest chunk
  int64_t per_group, blocks, per_block, tasks;  // heads per group; blocks of heads per group, heads per block
  int64_t Qp, Pp, Np;                           // Qc, P, N rounded up to whole vectors
  Layout(const SsdTrainArgs& a, int64_t W) {
    check_args(a);
    batch = a.batch, L = a.length, H = a.heads, P = a.head_dim, N = a.state, G = a.groups, Q = a.chunk;
    chunks = (L + Q - 1) / Q;
    Qc = std::min(Q, L);
    per_group = H / G;
    const int64_t for_tasks = (kMinTasks + batch * G - 1) / std::max<int64_t>(1, batch * G);
    blocks = std::max<int64_t>(1, std::max((per_group + kMaxHeadsPerTask - 1) / kMaxHeadsPerTask,
                                           std::min(per_group, for_tasks)));
    per_block = (per_group + blocks - 1) / blocks;
    blocks = per_block ? (per_group + per_block - 1) / per_block : 1;  // none empty
    tasks = batch * G * blocks;
    Qp = round_up(std::max<int64_t>(Qc, 1), W), Pp = round_up(std::max<int64_t>(P, 1), W),
    Np = round_up(std::max<int64_t>(N, 1), W);
  }
  // The batch, group and heads [h0, h1) of a task.
  void task(int64_t t, int64_t* b, int64_t* g, int64_t* h0, int64_t* h1) const {
    *b = t / (G * blocks);
    *g = t / blocks % G;
    const int64_t blk = t % blocks;
    *h0 = *g * per_group + blk * per_block;
    *h1 = std::min(*h0 + per_block, (*g + 1) * per_group);
  }
};

// Hands out 64-byte aligned pieces of one buffer; with a null base it only counts.
template <typename T>
struct Carver {
  T* base;
  int64_t used = 0;
  T* take(int64_t n) {
    T* p = base ? base + used : nullptr;
    used += round_up(std::max<int64_t>(n, 1), 64 / (int64_t)sizeof(T));
    return p;
  }
  // n doubles, in as many T values as hold them (pieces are 64-byte aligned, so aligned for double too)
  double* take_double(int64_t n) {
    T* p = take((n * (int64_t)sizeof(double) + (int64_t)sizeof(T) - 1) / (int64_t)sizeof(T));
    return reinterpret_cast<double*>(p);
  }
};

// One chunk's per-head quantities (see the glossary at the top).
template <typename T>
struct HeadVectors {
  T *dt, *slope, *ecs, *to_end;
  double* cs;
  void carve(Carver<T>& c, int64_t Qp) {
    dt = c.take(Qp), slope = c.take(Qp), ecs = c.take(Qp), to_end = c.take(Qp);
    cs = c.take_double(Qp);
  }
};

// dt, slope, cs, ecs and w of head h for the chunk's len tokens; raw = dt_raw of its first token (H apart).
template <typename T>
void head_vectors(const DtRule<T>& rule, const T* raw, int64_t H, T bias, T A, int64_t len, HeadVectors<T>& v) {
  double sum = 0;
  for (int64_t j = 0; j < len; ++j) {
    rule(raw[j * H] + bias, v.dt + j, v.slope + j);
    sum += (double)v.dt[j] * (double)A;
    v.cs[j] = sum;
  }
  const double last = v.cs[len - 1];
  for (int64_t j = 0; j < len; ++j) {
    v.ecs[j] = (T)v.cs[j];
    v.to_end[j] = (T)(last - v.cs[j]);
  }
  exp_inplace(v.ecs, len);
  exp_inplace(v.to_end, len);
}

// Row i of the decays and M: lrow[j] = exp(cs_i − cs_j) for j ≤ i, mrow = lrow ∘ cbrow there and 0 for
// i < j < len (the products read M's upper triangle as zeros).
template <typename T>
inline void decay_row(const double* __restrict cs, int64_t i, int64_t len, const T* __restrict cbrow,
                      T* __restrict lrow, T* __restrict mrow) {
  const double ci = cs[i];
  for (int64_t j = 0; j <= i; ++j) lrow[j] = (T)(ci - cs[j]);
  exp_inplace(lrow, i + 1);
  for (int64_t j = 0; j <= i; ++j) mrow[j] = lrow[j] * cbrow[j];
  std::fill(mrow + i + 1, mrow + len, T(0));
}

// Lm (scratch rows when lm is null) and M = Lm ∘ CB for a chunk (rows ld apart).
template <typename T>
void decay_matrices(const double* cs, int64_t len, const T* CB, int64_t ld, T* Lm, T* lrow_scratch, T* M) {
  for (int64_t i = 0; i < len; ++i)
    decay_row(cs, i, len, CB + i * ld, Lm ? Lm + i * ld : lrow_scratch, M + i * ld);
}

// One row i of the backward's intra-chunk terms, for j < i: t = dM ∘ Lm, dCB += t, W = t ∘ CB into row
// (for its sum) and colsum; and dCB's diagonal (Lm = 1 there; W's diagonal is left out).
template <typename T>
inline void intra_row(const T* __restrict dMi, const T* __restrict Li, const T* __restrict CBi, int64_t i,
                      T* __restrict dCBi, T* __restrict row, T* __restrict colsum) {
  for (int64_t j = 0; j < i; ++j) {
    const T t = dMi[j] * Li[j];
    const T w = t * CBi[j];
    dCBi[j] += t;
    row[j] = w;
    colsum[j] += w;
  }
  dCBi[i] += dMi[i];
}

// One head's start- or end-state term of the backward, for rows i < len of N values, ld apart:
// dots[i] = group_rows_i·d_i (off_i = C_i·dCoff_i or q_i = B_i·dBend_i of the glossary at the top),
// and d added to the group's sum over heads (Σ_h dCoff or Σ_h dBend).
template <typename T>
inline void head_state_terms(const T* group_rows, const T* d, int64_t len, int64_t N, int64_t ld, T* dots,
                             T* group_sum) {
  for (int64_t i = 0; i < len; ++i) {
    dots[i] = dot(group_rows + i * ld, d + i * ld, N);
    row_add(group_sum + i * ld, d + i * ld, N);
  }
}

// A group's chunk of B and C: row copies padded to Np (Bp, Cp), Bᵀ [N][Qp] and the lower triangle of
// C·Bᵀ [Qc][Qp].
template <typename T>
struct GroupChunk {
  T *Bp, *Cp, *Bt, *CB;
  void carve(Carver<T>& c, const Layout& l) {
    Bp = c.take((l.Qc + kMaxRows) * l.Np), Cp = c.take((l.Qc + kMaxRows) * l.Np);
    Bt = c.take((l.N + kMaxRows) * l.Qp), CB = c.take((l.Qc + kMaxRows) * l.Qp);
  }
  void load(const Layout& l, const T* Bsrc, const T* Csrc, int64_t len) {
    const int64_t stride = l.G * l.N;
    for (int64_t j = 0; j < len; ++j) {
      std::memcpy(Bp + j * l.Np, Bsrc + j * stride, l.N * sizeof(T));
      std::memcpy(Cp + j * l.Np, Csrc + j * stride, l.N * sizeof(T));
    }
    transpose(Bsrc, stride, len, l.N, Bt, l.Qp);
    gemm<false>(len, len, l.N, Span::columns_through_block, Cp, l.Np, Bt, l.Qp, store_to(CB, l.Qp));
  }
};

// Per-thread scratch of the forward.
template <typename T>
struct ForwardScratch {
  GroupChunk<T> group;
  HeadVectors<T> v;
  T *M, *lrow, *xd, *xw, *yq, *states;  // states: [per_block][N][Pp], each head's Sᵀ
  int64_t carve(T* base, const Layout& l) {
    Carver<T> c{base};
    group.carve(c, l);
    v.carve(c, l.Qp);
    M = c.take((l.Qc + kMaxRows) * l.Qp);
    lrow = c.take(l.Qp);
    xd = c.take((l.Qc + kMaxRows) * l.Pp);
    xw = c.take(l.Qc * l.Pp);
    yq = c.take(l.Qc * l.Pp);
    states = c.take(l.per_block * l.N * l.Pp);
    return c.used;
  }
};

// Per-thread scratch of the backward.
template <typename T>
struct BackwardScratch {
  GroupChunk<T> group;
  HeadVectors<T> v;
  T *dCB, *dCoff_sum, *dBend_sum;                               // the group's sums over heads
  T *Lm, *M, *dM, *xd, *xdT, *dyp, *dye, *S0p, *dSt, *dCoff, *dBend, *dxd;
  T *rowsum, *colsum, *row, *off, *q, *ddt_x;
  double* q_before;  // Σ_{j<k} q_j
  int64_t carve(T* base, const Layout& l) {
    Carver<T> c{base};
    const int64_t Q = l.Qc, R = kMaxRows;
    group.carve(c, l);
    v.carve(c, l.Qp);
    dCB = c.take((Q + R) * l.Qp), dCoff_sum = c.take(Q * l.Np), dBend_sum = c.take(Q * l.Np);
    Lm = c.take(Q * l.Qp), M = c.take((Q + R) * l.Qp), dM = c.take(Q * l.Qp);
    xd = c.take((Q + R) * l.Pp), xdT = c.take(l.P * l.Qp), dyp = c.take((Q + R) * l.Pp), dye = c.take((Q + R) * l.Pp);
    S0p = c.take(l.N % kWidth<T> ? l.P * l.Np : 0), dSt = c.take(l.N * l.Pp);
    dCoff = c.take(Q * l.Np), dBend = c.take(Q * l.Np), dxd = c.take(Q * l.Pp);
    rowsum = c.take(l.Qp), colsum = c.take(l.Qp), row = c.take(l.Qp), off = c.take(l.Qp), q = c.take(l.Qp),
    ddt_x = c.take(l.Qp);
    q_before = c.take_double(l.Qp);
    return c.used;
  }
};

// Shared scratch of the backward: the carried dS [batch][H][P][Np]; per-(batch, head) partials of dA,
// dD and dt_bias (doubles); and, when a group has several blocks of heads, the blocks' dC and dB of one
// chunk [batch][G][blocks][2][Qc][N].
template <typename T>
struct Shared {
  T *carry, *parts;
  double *dA, *dD, *bias;
  int64_t carve(T* base, const Layout& l) {
    Carver<T> c{base};
    carry = c.take(l.batch * l.H * l.P * l.Np);
    parts = c.take(l.blocks > 1 ? 2 * l.batch * l.G * l.blocks * l.Qc * l.N : 0);
    dA = c.take_double(l.batch * l.H), dD = c.take_double(l.batch * l.H), bias = c.take_double(l.batch * l.H);
    return c.used;
  }
};

// The calling thread's scratch of at least n values, kept from call to call and grown when a call needs
// more (see "Memory" at the top).
template <typename T>
T* thread_scratch(int64_t n) {
  static thread_local std::vector<T> buffer;
  if ((int64_t)buffer.size() < n) buffer.resize((size_t)n);
  return buffer.data();
}

// A worker's scratch S (ForwardScratch or BackwardScratch), carved from its piece of the per-thread
// scratch (a pool grown since `threads` was read gets a piece of its own, in `own`).
template <typename S, typename T>
S worker_scratch(T* shared, int threads, int64_t per_thread, const Layout& l, std::vector<T>& own) {
  const int slot = thread_index();
  T* base;
  if (slot < threads) {
    base = shared + slot * per_thread;
  } else {
    own.resize((size_t)per_thread);
    base = own.data();
  }
  S s;
  s.carve(base, l);
  return s;
}

}  // namespace

// ---- Forward ---------------------------------------------------------------------------------------------

template <typename T>
void ssd_forward(const SsdTrainArgs& a, const SsdTrainTensors<T>& in, T* y, T* boundary) {
  const Layout l(a, kWidth<T>);
  if (l.batch == 0 || l.L == 0 || l.H == 0) return;
  const int64_t L = l.L, H = l.H, P = l.P, N = l.N, G = l.G, HP = H * P;
  const DtRule<T> rule{a.softplus, (T)a.dt_min, (T)a.dt_max};
  const int64_t per_thread = ForwardScratch<T>().carve(nullptr, l);
  const int threads = num_threads();
  T* const scratch = thread_scratch<T>(per_thread * threads);

  parallel_for(l.tasks, [&](int64_t begin, int64_t end) {
    std::vector<T> own;
    ForwardScratch<T> s = worker_scratch<ForwardScratch<T>>(scratch, threads, per_thread, l, own);
    HeadVectors<T>& v = s.v;
    for (int64_t task = begin; task < end; ++task) {
      int64_t b, g, h0, h1;
      l.task(task, &b, &g, &h0, &h1);
      std::fill(s.states, s.states + (h1 - h0) * N * l.Pp, T(0));
      for (int64_t c = 0; c < l.chunks; ++c) {
        const int64_t t0 = c * l.Q, len = std::min(l.Q, L - t0), row0 = b * L + t0;
        s.group.load(l, in.B + (row0 * G + g) * N, in.C + (row0 * G + g) * N, len);
        const T *Bp = s.group.Bp, *Cp = s.group.Cp;
        for (int64_t h = h0; h < h1; ++h) {
          T* St = s.states + (h - h0) * N * l.Pp;
          transpose(St, l.Pp, N, P, boundary + ((b * l.chunks + c) * H + h) * P * N, N);
          const T* x = in.x + (row0 * H + h) * P;
          if (h + 1 < h1) prefetch_rows(x + P, len, HP, P * (int64_t)sizeof(T));
          head_vectors(rule, in.dt + row0 * H + h, H, in.dt_bias ? in.dt_bias[h] : T(0), in.A[h], len, v);
          decay_matrices(v.cs, len, s.group.CB, l.Qp, (T*)nullptr, s.lrow, s.M);
          for (int64_t j = 0; j < len; ++j) row_scale(s.xd + j * l.Pp, v.dt[j], x + j * HP, P);
          // y = M·xd + diag(ecs)·(C·Sᵀ) + D·x
          if (c > 0) gemm<false>(len, P, N, Span::all, Cp, l.Np, St, l.Pp, store_to(s.yq, l.Pp));
          Epilogue<T> to_y{y + (row0 * H + h) * P, HP};
          if (in.D) to_y.add[0] = {x, HP, in.D[h]};
          if (c > 0) to_y.add[1] = {s.yq, l.Pp, T(1), v.ecs};
          gemm<false>(len, P, len, Span::k_through_block, s.M, l.Qp, s.xd, l.Pp, to_y);
          // Sᵀ ← exp(cs_last)·Sᵀ + Bᵀ·(diag(w)·xd), only where a later chunk reads it
          if (c + 1 < l.chunks) {
            for (int64_t j = 0; j < len; ++j) row_scale(s.xw + j * l.Pp, v.to_end[j], s.xd + j * l.Pp, l.Pp);
            gemm<true>(N, P, len, Span::all, Bp, l.Np, s.xw, l.Pp, store_added(St, l.Pp, St, l.Pp, v.ecs[len - 1]));
          }
        }
      }
    }
  });
}

// ---- Backward --------------------------------------------------------------------------------------------

template <typename T>
void ssd_backward(const SsdTrainArgs& a, const SsdTrainTensors<T>& in, const T* boundary, const T* dy,
                  const SsdTrainGrads<T>& out) {
  const Layout l(a, kWidth<T>);
  if (l.batch == 0 || l.L == 0) return;
  const int64_t L = l.L, H = l.H, P = l.P, N = l.N, G = l.G, HP = H * P;
  if (H == 0) {  // nothing reads B or C
    std::fill(out.dB, out.dB + l.batch * L * G * N, T(0));
    std::fill(out.dC, out.dC + l.batch * L * G * N, T(0));
    return;
  }
  const DtRule<T> rule{a.softplus, (T)a.dt_min, (T)a.dt_max};
  const bool with_D = in.D && out.dD, with_bias = in.dt_bias && out.ddt_bias;
  const int64_t per_thread = BackwardScratch<T>().carve(nullptr, l);
  const int threads = num_threads();
  Shared<T> shared;
  T* const scratch = thread_scratch<T>(per_thread * threads + shared.carve(nullptr, l));
  shared.carve(scratch + per_thread * threads, l);
  T* const carry = shared.carry;
  double *const dA_part = shared.dA, *const dD_part = shared.dD, *const bias_part = shared.bias;
  const int64_t part_size = l.Qc * N;  // one block's dB or dC of one chunk
  T* const parts = shared.parts;

  for (int64_t c = l.chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * l.Q, len = std::min(l.Q, L - t0);
    const bool first = c == 0, last = c == l.chunks - 1;
    parallel_for(l.tasks, [&](int64_t begin, int64_t end) {
      std::vector<T> own;
      BackwardScratch<T> s = worker_scratch<BackwardScratch<T>>(scratch, threads, per_thread, l, own);
      HeadVectors<T>& v = s.v;
      const int64_t Qp = l.Qp, Pp = l.Pp, Np = l.Np;
      for (int64_t task = begin; task < end; ++task) {
        int64_t b, g, h0, h1;
        l.task(task, &b, &g, &h0, &h1);
        const int64_t row0 = b * L + t0;
        s.group.load(l, in.B + (row0 * G + g) * N, in.C + (row0 * G + g) * N, len);
        const T *Bp = s.group.Bp, *Cp = s.group.Cp, *CB = s.group.CB;
        for (int64_t i = 0; i < len; ++i) {
          std::fill(s.dCB + i * Qp, s.dCB + (i + 1) * Qp, T(0));
          std::fill(s.dCoff_sum + i * Np, s.dCoff_sum + (i + 1) * Np, T(0));
          std::fill(s.dBend_sum + i * Np, s.dBend_sum + (i + 1) * Np, T(0));
        }

        for (int64_t h = h0; h < h1; ++h) {
          const T* x = in.x + (row0 * H + h) * P;
          const T* dyh = dy + (row0 * H + h) * P;
          const T Ah = in.A[h], Dh = in.D ? in.D[h] : T(0);
          if (h + 1 < h1) {
            prefetch_rows(x + P, len, HP, P * (int64_t)sizeof(T));
            prefetch_rows(dyh + P, len, HP, P * (int64_t)sizeof(T));
          }
          head_vectors(rule, in.dt + row0 * H + h, H, in.dt_bias ? in.dt_bias[h] : T(0), Ah, len, v);
          decay_matrices(v.cs, len, CB, Qp, s.Lm, (T*)nullptr, s.M);
          for (int64_t j = 0; j < len; ++j) {
            row_scale(s.xd + j * Pp, v.dt[j], x + j * HP, P);
            std::memcpy(s.dyp + j * Pp, dyh + j * HP, P * sizeof(T));
            row_scale(s.dye + j * Pp, v.ecs[j], dyh + j * HP, P);
          }
          transpose(s.xd, Pp, len, P, s.xdT, Qp);

          // Inside the chunk: dM = dy·xdᵀ; dCB += dM ∘ Lm; W = dM ∘ M summed by rows and columns.
          gemm<false>(len, len, P, Span::columns_through_block, s.dyp, Pp, s.xdT, Qp, store_to(s.dM, Qp));
          std::fill(s.colsum, s.colsum + len, T(0));
          for (int64_t i = 0; i < len; ++i) {
            intra_row(s.dM + i * Qp, s.Lm + i * Qp, CB + i * Qp, i, s.dCB + i * Qp, s.row, s.colsum);
            const int64_t whole = round_up(i, kWidth<T>);  // (zeros to whole vectors: no scalar tail)
            std::fill(s.row + i, s.row + whole, T(0));
            s.rowsum[i] = sum(s.row, whole);
          }

          // The state terms: the start state S (not at the first chunk, where it is zero) and the
          // end state's adjoint dS (not at the last chunk, where it is zero).
          T* dS = carry + (b * H + h) * P * Np;
          const T* S = boundary + ((b * l.chunks + c) * H + h) * P * N;
          int64_t ldS = N;
          if (N % kWidth<T> && !first) {
            for (int64_t p = 0; p < P; ++p) std::memcpy(s.S0p + p * Np, S + p * N, N * sizeof(T));
            S = s.S0p, ldS = Np;
          }
          std::fill(s.off, s.off + len, T(0));
          std::fill(s.q, s.q + len, T(0));
          double E = 0;
          if (!first) {
            gemm<false>(len, N, P, Span::all, s.dye, Pp, S, ldS, store_to(s.dCoff, Np));
            head_state_terms(Cp, s.dCoff, len, N, Np, s.off, s.dCoff_sum);
          }
          if (!last) {
            gemm<false>(len, N, P, Span::all, s.xd, Pp, dS, Np, store_scaled(s.dBend, Np, (const T*)v.to_end));
            head_state_terms(Bp, s.dBend, len, N, Np, s.q, s.dBend_sum);
            if (!first) {
              for (int64_t p = 0; p < P; ++p) E += (double)dot(dS + p * Np, S + p * ldS, N);
              E *= (double)v.ecs[len - 1];
            }
            transpose(dS, Np, P, N, s.dSt, Pp);
            gemm<false>(len, P, N, Span::all, Bp, Np, s.dSt, Pp, store_scaled(s.dxd, Pp, (const T*)v.to_end));
          }
          // dxd (+)= Mᵀ·dy
          // (at the last chunk there is no first part: stored, not added, since what the buffer holds
          // from before need not be finite)
          if (last)
            gemm<true>(len, P, len, Span::k_from_block, s.M, Qp, s.dyp, Pp, store_to(s.dxd, Pp));
          else
            gemm<true>(len, P, len, Span::k_from_block, s.M, Qp, s.dyp, Pp, store_added(s.dxd, Pp, s.dxd, Pp, T(1)));

          // dx, the direct part of ddt, dD.
          T* dxh = out.dx + (row0 * H + h) * P;
          double dD_sum = 0;
          for (int64_t j = 0; j < len; ++j) {
            const T* dxdj = s.dxd + j * Pp;
            const T *xj = x + j * HP, *dyj = dyh + j * HP;
            s.ddt_x[j] = dot(xj, dxdj, P);
            row_combine(dxh + j * HP, v.dt[j], dxdj, Dh, dyj, P);
            if (with_D) dD_sum += (double)dot(dyj, xj, P);
          }

          // The adjoint carried to the chunk before: dS ← exp(cs_last)·dS + dyeᵀ·C.
          if (!first && last)
            gemm<true>(P, N, len, Span::all, s.dye, Pp, Cp, Np, store_to(dS, Np));
          else if (!first)
            gemm<true>(P, N, len, Span::all, s.dye, Pp, Cp, Np, store_added(dS, Np, (const T*)dS, Np, v.ecs[len - 1]));

          // da_k, then ddt, dA, dt_bias.
          double before = 0;
          for (int64_t k = 0; k < len; ++k) {
            s.q_before[k] = before;
            before += (double)s.q[k];
          }
          double after = 0, dA_sum = 0, bias_sum = 0;
          T* ddt = out.ddt + row0 * H + h;
          for (int64_t k = len - 1; k >= 0; --k) {
            after += (double)s.off[k] + (double)s.rowsum[k] - (double)s.colsum[k];
            const double da = after + E + s.q_before[k];
            const T g_raw = (T)(((double)Ah * da + (double)s.ddt_x[k]) * (double)v.slope[k]);
            ddt[k * H] = g_raw;
            bias_sum += (double)g_raw;
            dA_sum += (double)v.dt[k] * da;
          }
          const int64_t bh = b * H + h;
          dA_part[bh] = (last ? 0.0 : dA_part[bh]) + dA_sum;
          bias_part[bh] = (last ? 0.0 : bias_part[bh]) + bias_sum;
          dD_part[bh] = (last ? 0.0 : dD_part[bh]) + dD_sum;
        }

        // The group's dC = dCB·B + Σ dCoff and dB = dCBᵀ·C + Σ dBend, to the outputs or the block's partial.
        T *dC, *dB;
        int64_t ld;
        if (l.blocks == 1) {
          dC = out.dC + (row0 * G + g) * N, dB = out.dB + (row0 * G + g) * N, ld = G * N;
        } else {
          const int64_t at = ((b * G + g) * l.blocks + (h0 - g * l.per_group) / l.per_block) * 2 * part_size;
          dC = parts + at, dB = dC + part_size, ld = N;
        }
        gemm<false>(len, N, len, Span::k_through_block, s.dCB, Qp, Bp, Np,
                    store_added(dC, ld, (const T*)s.dCoff_sum, Np, T(1)));
        gemm<true>(len, N, len, Span::k_from_block, s.dCB, Qp, Cp, Np,
                   store_added(dB, ld, (const T*)s.dBend_sum, Np, T(1)));
      }
    });
    if (l.blocks > 1)
      parallel_for(l.batch * len, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / len, i = r % len;
          for (int64_t g = 0; g < G; ++g) {
            T* oC = out.dC + ((b * L + t0 + i) * G + g) * N;
            T* oB = out.dB + ((b * L + t0 + i) * G + g) * N;
            for (int64_t blk = 0; blk < l.blocks; ++blk) {
              const T* pC = parts + ((b * G + g) * l.blocks + blk) * 2 * part_size + i * N;
              const T* pB = pC + part_size;
              for (int64_t n = 0; n < N; ++n) {
                oC[n] = blk ? oC[n] + pC[n] : pC[n];
                oB[n] = blk ? oB[n] + pB[n] : pB[n];
              }
            }
          }
        }
      });
  }
  for (int64_t h = 0; h < H; ++h) {
    double dA = 0, dD = 0, bias = 0;
    for (int64_t b = 0; b < l.batch; ++b) {
      dA += dA_part[b * H + h];
      dD += dD_part[b * H + h];
      bias += bias_part[b * H + h];
    }
    out.dA[h] += (T)dA;
    if (with_D) out.dD[h] += (T)dD;
    if (with_bias) out.ddt_bias[h] += (T)bias;
  }
}

int64_t ssd_backward_scratch_bytes(const SsdTrainArgs& a) {
  const Layout l(a, kWidth<float>);
  const int64_t per_thread = BackwardScratch<float>().carve(nullptr, l);
  return (per_thread * num_threads() + Shared<float>().carve(nullptr, l)) * (int64_t)sizeof(float);
}

template void ssd_forward<float>(const SsdTrainArgs&, const SsdTrainTensors<float>&, float*, float*);
template void ssd_forward<double>(const SsdTrainArgs&, const SsdTrainTensors<double>&, double*, double*);
template void ssd_backward<float>(const SsdTrainArgs&, const SsdTrainTensors<float>&, const float*, const float*,
                                  const SsdTrainGrads<float>&);
template void ssd_backward<double>(const SsdTrainArgs&, const SsdTrainTensors<double>&, const double*, const double*,
                                   const SsdTrainGrads<double>&);

}  // namespace mssm::train::MSSM_LEVEL
