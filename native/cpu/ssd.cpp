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
// Inside the kernel the states are held transposed, [N, P], so that (3) and (5) are plain row-major
// products.
//
// Work: C·Bᵀ is computed once per (b, chunk, group) and shared by the group's heads (stage A). Each
// (b, head) then walks its chunks in order (stage B), keeping its state: per chunk one pass of
// register-blocked products writes y (steps 5 and 2 accumulate into the same registers, the decays
// applied in between) and one updates the state in place (steps 3 and 4). No per-chunk states are
// stored: a thread takes its heads a few at a time, chunk by chunk, so that both the chunk's inputs
// and the heads' states stay in cache. state_in and state_out are transposed there too, head by head.
// The sequence is processed in windows of chunks so that the C·Bᵀ blocks (b·window·G·Q² floats)
// stay bounded.
//
// Cost per token and head: P·(2N + Q/2) multiply-adds for the products above, so the chunk size
// trades the Q/2 of the masked product against per-chunk overheads; the result does not depend on it.
//
// With SsdArgs::bf16_products (avx512bf16 level) the products C·S, (masked C·Bᵀ)·(dt'·x) over earlier
// row blocks and Bᵀ·xw round their operands to bf16 and accumulate in f32 with VDPBF16PS, twice the
// f32 FMA rate; the state, the decays, C·Bᵀ itself and the small triangle of each row block stay f32.
#include "level.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define MSSM_SSD_VECTOR 1
#else
#define MSSM_SSD_VECTOR 0
#endif
#if defined(__AVX512BF16__)
#define MSSM_SSD_BF16 1
#else
#define MSSM_SSD_BF16 0
#endif

#include "../core/threadpool.h"
#include "simd.h"

namespace mssm::cpu::MSSM_LEVEL {
namespace {

// A thread takes at least this many multiply-adds of work, so tiny problems stay on one thread.
constexpr int64_t kMinWorkPerThread = 1 << 15;
// Upper bound on the C·Bᵀ blocks kept for one window of chunks (floats; 4 MiB).
constexpr int64_t kWindowFloats = int64_t(1) << 20;
// States a thread cycles through chunk by chunk (floats; 256 KiB): they should stay in L2.
constexpr int64_t kStateCacheFloats = int64_t(1) << 16;

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

inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }

inline float process_dt(const SsdArgs& args, float raw, int64_t h) {
  float v = raw + (args.dt_bias ? args.dt_bias[h] : 0.0f);
  if (args.dt_softplus) v = softplus(v);
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

// softplus over n values in place (the chunk's dt + dt_bias): log1p(exp(v)) through the vector exp,
// with the 1 + e rounding avoided as in the selective scan (log1p(e) = 2·atanh(e / (2 + e))).
void softplus_inplace(float* v, int64_t n) {
  int64_t k = 0;
#if MSSM_SSD_VECTOR
  auto one = [](vec x) {
    const vec zero = vzero();
#if defined(__AVX512F__)
    const vec e = vexp(_mm512_sub_ps(zero, _mm512_abs_ps(x)));
    const vec pos = _mm512_max_ps(x, zero);
#else
    const vec e = vexp(_mm256_sub_ps(zero, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x)));
    const vec pos = _mm256_max_ps(x, zero);
#endif
    const vec s = vdiv(e, vadd(vset(2.0f), e));
    const vec s2 = vmul(s, s);
    vec series = vset(1.0f / 15.0f);
    for (const float c : {1.0f / 13.0f, 1.0f / 11.0f, 1.0f / 9.0f, 1.0f / 7.0f, 1.0f / 5.0f, 1.0f / 3.0f, 1.0f})
      series = vfma(series, s2, vset(c));
    const vec r = vfma(vadd(s, s), series, pos);
#if defined(__AVX512F__)
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vset(20.0f), _CMP_GT_OQ), r, x);
#else
    return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, vset(20.0f), _CMP_GT_OQ));
#endif
  };
  for (; k + kWidth <= n; k += kWidth) vstore(v + k, one(vload(v + k)));
  if (k < n) {
    const mask m = tail_mask(n - k);
    vstore_tail(v + k, one(vload_tail(v + k, m)), m);
    return;
  }
#endif
  for (; k < n; ++k) v[k] = softplus(v[k]);
}

// out[j] = exp((float)(base - cum[j])) for j < n, the differences taken in double.
void exp_of_differences(double base, const double* cum, int64_t n, float* out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512d vbase = _mm512_set1_pd(base);
  for (; j < n; j += kWidth) {
    const mask m = tail_mask(std::min<int64_t>(kWidth, n - j));
    const __m512d lo = _mm512_sub_pd(vbase, _mm512_maskz_loadu_pd((__mmask8)m, cum + j));
    const __m512d hi = _mm512_sub_pd(vbase, _mm512_maskz_loadu_pd((__mmask8)(m >> 8), cum + j + 8));
    const vec d = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
    vstore_tail(out + j, vexp(d), m);
  }
#else
  for (; j < n; ++j) out[j] = (float)(base - cum[j]);
  exp_inplace(out, n);
#endif
}

#if MSSM_SSD_VECTOR
// ---- Register-blocked products --------------------------------------------------------------
// acc[r][v] += Σ_k a(r, k) · b[k, v·kWidth + lane] for k < K, with a(r, k) = a[r·a_rs + k·a_ks] (a
// broadcast, any strides: the products read B and C in place) and b row-major with leading
// dimension ldb; the last vector column loads only `tail` lanes.
#if defined(__AVX512F__)
constexpr int kRowsMax = 6, kVecsMax = 4;  // 24 accumulators of 32 registers
#else
constexpr int kRowsMax = 4, kVecsMax = 2;  // 8 accumulators of 16 registers
#endif

// Every member is inlined into its caller so that the accumulators live in registers.
#define MSSM_INLINE inline __attribute__((always_inline))
// Loops over the R×V accumulators are unrolled in full: an accumulator indexed at run time would be
// kept in memory.
#define MSSM_UNROLL _Pragma("GCC unroll 32")
template <int R, int V>
struct Acc {
  vec v[R][V];
  MSSM_INLINE void zero() {
    MSSM_UNROLL for (int r = 0; r < R; ++r)
      MSSM_UNROLL for (int c = 0; c < V; ++c) v[r][c] = vzero();
  }
  MSSM_INLINE void accumulate(int64_t K, const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb,
                              mask tail) {
    for (int64_t k = 0; k < K; ++k, a += a_ks, b += ldb) {
      vec bv[V];
      MSSM_UNROLL for (int c = 0; c < V; ++c)
        bv[c] = c == V - 1 ? vload_tail(b + c * kWidth, tail) : vload(b + c * kWidth);
      MSSM_UNROLL for (int r = 0; r < R; ++r) {
        const vec av = vset(a[r * a_rs]);
        MSSM_UNROLL for (int c = 0; c < V; ++c) v[r][c] = vfma(av, bv[c], v[r][c]);
      }
    }
  }
#if MSSM_SSD_BF16
  // As accumulate over K = 2·pairs in bf16: a(r, k2) = a[r·a_rs + k2] holds the pair (a(r, 2k2),
  // a(r, 2k2 + 1)), b is paired (pack_pairs) with ldb lanes between pair rows.
  MSSM_INLINE void accumulate_pairs(int64_t pairs, const uint32_t* a, int64_t a_rs, const uint32_t* b, int64_t ldb,
                                    mask tail) {
    for (int64_t k = 0; k < pairs; ++k, ++a, b += ldb) {
      __m512bh bv[V];
      MSSM_UNROLL for (int c = 0; c < V; ++c)
        bv[c] = (__m512bh)(c == V - 1 ? _mm512_maskz_loadu_epi32(tail, b + c * kWidth)
                                      : _mm512_loadu_si512(b + c * kWidth));
      MSSM_UNROLL for (int r = 0; r < R; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[r * a_rs]);
        MSSM_UNROLL for (int c = 0; c < V; ++c) v[r][c] = _mm512_dpbf16_ps(v[r][c], av, bv[c]);
      }
    }
  }
#endif
  MSSM_INLINE void scale(float s) {
    const vec sv = vset(s);
    MSSM_UNROLL for (int r = 0; r < R; ++r)
      MSSM_UNROLL for (int c = 0; c < V; ++c) v[r][c] = vmul(v[r][c], sv);
  }
  // Row r ·= scale[r].
  MSSM_INLINE void scale_rows(const float* scale) {
    MSSM_UNROLL for (int r = 0; r < R; ++r) {
      const vec s = vset(scale[r]);
      MSSM_UNROLL for (int c = 0; c < V; ++c) v[r][c] = vmul(v[r][c], s);
    }
  }
  MSSM_INLINE void store(float* out, int64_t ldo, mask tail) const {
    MSSM_UNROLL for (int r = 0; r < R; ++r)
      MSSM_UNROLL for (int c = 0; c < V; ++c) {
        if (c == V - 1)
          vstore_tail(out + r * ldo + c * kWidth, v[r][c], tail);
        else
          vstore(out + r * ldo + c * kWidth, v[r][c]);
      }
  }
};

// Calls fn(integral R, integral V) for rows = R ≤ kRowsMax and vecs = V ≤ kVecsMax.
template <typename F>
inline void dispatch(int64_t rows, int64_t vecs, F&& fn) {
  auto by_v = [&](auto r) {
    switch (vecs) {
      case 1: fn(r, std::integral_constant<int, 1>()); break;
      case 2: fn(r, std::integral_constant<int, 2>()); break;
      case 3: fn(r, std::integral_constant<int, 3>()); break;
      case 4: if constexpr (kVecsMax >= 4) fn(r, std::integral_constant<int, 4>()); break;
      default: break;
    }
  };
  switch (rows) {
    case 1: by_v(std::integral_constant<int, 1>()); break;
    case 2: by_v(std::integral_constant<int, 2>()); break;
    case 3: by_v(std::integral_constant<int, 3>()); break;
    case 4: if constexpr (kRowsMax >= 4) by_v(std::integral_constant<int, 4>()); break;
    case 5: if constexpr (kRowsMax >= 5) by_v(std::integral_constant<int, 5>()); break;
    case 6: if constexpr (kRowsMax >= 6) by_v(std::integral_constant<int, 6>()); break;
    default: break;
  }
}

// Walks the column blocks of `cols` (kVecsMax vectors each, the last one partial) and calls
// fn(j0, vecs, tail).
template <typename F>
inline void for_column_blocks(int64_t cols, F&& fn) {
  for (int64_t j0 = 0; j0 < cols; j0 += kVecsMax * kWidth) {
    const int64_t width = std::min<int64_t>(kVecsMax * kWidth, cols - j0);
    const int64_t vecs = (width + kWidth - 1) / kWidth;
    fn(j0, vecs, tail_mask(width - (vecs - 1) * kWidth));
  }
}
#endif

#if MSSM_SSD_BF16
// ---- bf16 operands ------------------------------------------------------------------------------
// VDPBF16PS adds a0·b0 + a1·b1 into each f32 lane, (a0, a1) and (b0, b1) the bf16 halves of the
// lane's 32 bits, so the products take k two at a time: the broadcast operand as a row of pairs
// (neighbouring k, neighbours in memory) and the vector operand "paired", lane p of pair row k2
// holding (b[2k2, p], b[2k2 + 1, p]). An odd K ends with a pair whose second half is zero. Rounding is
// to nearest even, as the prefill GEMM rounds x.

// out[k2] = (bf16(x[2k2]), bf16(x[2k2 + 1])) for k2 < pairs, x[k] taken as 0 for k ≥ n.
void round_pairs(const float* x, int64_t n, int64_t pairs, uint32_t* out) {
  for (int64_t k2 = 0; k2 < pairs; k2 += kWidth) {
    const int64_t k = 2 * k2;
    const vec lo = vload_tail(x + k, tail_mask(std::clamp<int64_t>(n - k, 0, kWidth)));
    const vec hi = vload_tail(x + k + kWidth, tail_mask(std::clamp<int64_t>(n - k - kWidth, 0, kWidth)));
    _mm512_mask_storeu_epi32(out + k2, tail_mask(std::min<int64_t>(kWidth, pairs - k2)),
                             (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// Pairs the K rows of x (P floats each, ldx apart): out[k2·P + p] = (bf16(x[2k2, p]), bf16(x[2k2 + 1, p])),
// row K taken as zeros.
void pack_pairs(const float* x, int64_t ldx, int64_t K, int64_t P, uint32_t* out) {
  for (int64_t k = 0; k < K; k += 2) {
    const float* first = x + k * ldx;
    const float* second = k + 1 < K ? first + ldx : nullptr;
    uint32_t* o = out + k / 2 * P;
    for (int64_t p = 0; p < P; p += kWidth) {
      const mask m = tail_mask(std::min<int64_t>(kWidth, P - p));
      const __m512i a = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(vload_tail(first + p, m)));
      const __m512i b = second ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(vload_tail(second + p, m)))
                               : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(o + p, m, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
}
#endif


// Per-thread scratch of stage B, reused across calls.
struct ChunkScratch {
  std::vector<double> cum;       // [Q] cumulative a inside the chunk (double: the differences stay exact)
  std::vector<float> dtp;        // [Q] dt'
  std::vector<float> decay;      // [Q] exp(cum[i])
  std::vector<float> to_end;     // [Q] exp(cum[last] - cum[j])
  std::vector<float> lseg;       // [Q, Q] Lseg ⊙ C·Bᵀ (scalar path)
  std::vector<float> to_block;   // [Q] exp(cum[i0] - cum[j]) for one row block (vector path)
  std::vector<float> within;     // [Q, kRowsMax] Lseg inside each row block (vector path)
  std::vector<float> block;      // [kRowsMax, Q] the a operand of one row block (vector path)
  std::vector<float> xdt;        // [Q, P] dt'_j·x_j
  std::vector<float> xw;         // [Q, P] dt'_j·x_j·exp(cum[last] - cum[j])
  std::vector<float> bt;         // [N, Q] Bᵀ of one chunk (stage A)
  std::vector<float> gate;       // [P]
  // bf16_products: the paired operands (see "bf16 operands")
  std::vector<uint32_t> xdt_pairs;    // [Q/2, P] xdt
  std::vector<uint32_t> xw_pairs;     // [Q/2, P] xw
  std::vector<uint32_t> state_pairs;  // [N/2, P] the state at the chunk start
  std::vector<uint32_t> block_pairs;  // [kRowsMax, Q/2] rows of block
};
ChunkScratch& chunk_scratch() {
  static thread_local ChunkScratch scratch;
  return scratch;
}

template <typename T>
void grow(std::vector<T>& v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize(n);
}

// cb[i, j] = C_i · B_j for j ≤ i < n_tok (rows i of C and B `stride` floats apart); entries above
// the diagonal are left as they are.
void chunk_scores(const float* Cc, const float* Bc, int64_t stride, int64_t n_tok, int64_t N, int64_t Q, float* cb,
                  std::vector<float>& bt_buffer) {
#if MSSM_SSD_VECTOR
  grow(bt_buffer, N * Q);
  float* bt = bt_buffer.data();  // Bᵀ [N, Q]
  for (int64_t j = 0; j < n_tok; ++j)
    for (int64_t n = 0; n < N; ++n) bt[n * Q + j] = Bc[j * stride + n];
  for (int64_t i0 = 0; i0 < n_tok; i0 += kRowsMax) {
    const int64_t rows = std::min<int64_t>(kRowsMax, n_tok - i0);
    const int64_t cols = std::min(n_tok, i0 + rows);  // the row block needs columns j ≤ i
    for_column_blocks(cols, [&](int64_t j0, int64_t vecs, mask tail) {
      dispatch(rows, vecs, [&](auto r, auto v) {
        Acc<decltype(r)::value, decltype(v)::value> acc;
        acc.zero();
        acc.accumulate(N, Cc + i0 * stride, stride, 1, bt + j0, Q, tail);
        acc.store(cb + i0 * Q + j0, Q, tail);
      });
    });
  }
#else
  (void)bt_buffer;
  for (int64_t i = 0; i < n_tok; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      float s = 0.0f;
      for (int64_t n = 0; n < N; ++n) s += Cc[i * stride + n] * Bc[j * stride + n];
      cb[i * Q + j] = s;
    }
#endif
}

struct ChunkRun {
  const SsdArgs& args;
  int64_t L, H, P, N, G, Q, heads_per_group;
  int64_t x_stride, bc_stride;  // floats between tokens in x, and in B and C
};

// SsdArgs' strides with 0 resolved to the packed layouts.
int64_t x_stride_of(const SsdArgs& a) { return a.x_stride ? a.x_stride : a.heads * a.head_dim; }
int64_t bc_stride_of(const SsdArgs& a) { return a.bc_stride ? a.bc_stride : a.groups * a.state; }

// One chunk of one (b, h): writes y for its tokens and moves `state` ([N, P]) to the chunk's end.
// cb: the chunk's C·Bᵀ ([Q, Q], lower triangle). state_is_zero: skip the products with the state.
// c_pairs, bt_pairs: for bf16 products, the chunk's C ([Q, N/2] pairs) and Bᵀ ([N, Q/2] pairs) rounded
// to bf16; null for f32 products.
void chunk_step(const ChunkRun& run, int64_t b, int64_t h, int64_t t0, int64_t n_tok, const float* cb, float* state,
                bool state_is_zero, bool need_state, ChunkScratch& scratch, const uint32_t* c_pairs,
                const uint32_t* bt_pairs) {
  (void)c_pairs;  // read only where bf16 products are compiled in
  (void)bt_pairs;
  const SsdArgs& args = run.args;
  const int64_t L = run.L, H = run.H, P = run.P, N = run.N, Q = run.Q;
  const int64_t g = h / run.heads_per_group;
  const int64_t row_stride = H * P;          // between tokens in z and y
  const int64_t x_stride = run.x_stride;     // between tokens in x
  const int64_t bc_stride = run.bc_stride;   // between tokens in B and C
  const float* x = args.x + (b * L + t0) * x_stride + h * P;
  float* y = args.y + ((b * L + t0) * H + h) * P;
  const float* z = args.z ? args.z + ((b * L + t0) * H + h) * P : nullptr;
  const float* Bc = args.B + (b * L + t0) * bc_stride + g * N;
  const float* Cc = args.C + (b * L + t0) * bc_stride + g * N;

  double* cum = scratch.cum.data();
  float* dtp = scratch.dtp.data();
  float* decay = scratch.decay.data();
  float* to_end = scratch.to_end.data();
  float* xdt = scratch.xdt.data();
  float* xw = scratch.xw.data();

  // dt', cum, the decays from the chunk start and to the chunk end.
  const float* dt = args.dt + (b * L + t0) * H + h;
  const float bias = args.dt_bias ? args.dt_bias[h] : 0.0f;
  for (int64_t i = 0; i < n_tok; ++i) dtp[i] = dt[i * H] + bias;
  if (args.dt_softplus) softplus_inplace(dtp, n_tok);
  const double A = args.A[h];
  double sum = 0.0;
  for (int64_t i = 0; i < n_tok; ++i) {
    dtp[i] = std::min(std::max(dtp[i], args.dt_min), args.dt_max);
    sum += dtp[i] * A;
    cum[i] = sum;
  }
  for (int64_t i = 0; i < n_tok; ++i) decay[i] = (float)cum[i];  // exp(cum[i])
  exp_inplace(decay, n_tok);
  exp_of_differences(cum[n_tok - 1], cum, n_tok, to_end);

  for (int64_t j = 0; j < n_tok; ++j) {
    const float* xj = x + j * x_stride;
    float* o = xdt + j * P;
    float* w = xw + j * P;
    const float d = dtp[j], e = to_end[j];
    for (int64_t p = 0; p < P; ++p) {
      o[p] = d * xj[p];
      w[p] = o[p] * e;
    }
  }

  const float Dh = args.D ? args.D[h] : 0.0f;
#if MSSM_SSD_VECTOR
#if MSSM_SSD_BF16
  const bool pairs = c_pairs != nullptr;
  const int64_t n_pairs = (N + 1) / 2, q_pairs = (Q + 1) / 2;
  uint32_t* const xdt_p = scratch.xdt_pairs.data();
  uint32_t* const xw_p = scratch.xw_pairs.data();
  uint32_t* const state_p = scratch.state_pairs.data();
  uint32_t* const block_p = scratch.block_pairs.data();
  if (pairs) {
    pack_pairs(xdt, P, n_tok, P, xdt_p);
    if (need_state) pack_pairs(xw, P, n_tok, P, xw_p);
    if (!state_is_zero) pack_pairs(state, P, N, P, state_p);
  }
  static_assert(kRowsMax % 2 == 0, "row blocks start at even tokens: the pairs of earlier tokens are whole");
#endif
  // (1), (2) and (5) by row blocks of kRowsMax rows from i0. Lseg[i, j] splits as
  // exp(cum[i] - cum[i0]) · exp(cum[i0] - cum[j]) for j < i0 (both factors ≤ 1, each from a difference
  // taken in double, so the product is as accurate as one exp), which leaves one exp per column and
  // per row of the block instead of one per element; the block's own triangle j ≥ i0 is taken
  // directly. Row i of y:
  //   y_i = from_block_i · (exp(cum[i0])·(C_i · S) + Σ_{j<i0} (C·Bᵀ[i, j]·to_block_j)·xdt_j)
  //         + Σ_{i0≤j≤i} Lseg[i, j]·C·Bᵀ[i, j]·xdt_j
  // with from_block_i = exp(cum[i] - cum[i0]), to_block_j = exp(cum[i0] - cum[j]); then D·x and the
  // gate.
  float* to_block = scratch.to_block.data();
  // [kRowsMax, Q]: C·Bᵀ[i, j]·to_block_j, then the block's triangle of Lseg ⊙ C·Bᵀ
  float* block = scratch.block.data();
  // The triangles of all row blocks at once: within[i·kRowsMax + k] = exp(cum[i] - cum[i0 + k]) for
  // the row block i0 of row i and k ≤ i - i0 (0 beyond: the argument is set far below).
  float* within = scratch.within.data();
  for (int64_t i = 0; i < n_tok; ++i) {
    const int64_t i0 = i - i % kRowsMax;
    for (int64_t k = 0; k < kRowsMax; ++k)
      within[i * kRowsMax + k] = i0 + k <= i ? (float)(cum[i] - cum[i0 + k]) : -1e4f;
  }
  exp_inplace(within, n_tok * kRowsMax);
  for (int64_t i0 = 0; i0 < n_tok; i0 += kRowsMax) {
    const int64_t rows = std::min<int64_t>(kRowsMax, n_tok - i0);
    const int64_t k_end = std::min(n_tok, i0 + rows);
    exp_of_differences(cum[i0], cum, i0, to_block);
    float from_block[kRowsMax];
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const float* cbi = cb + i * Q;
      float* row = block + r * Q;
      for (int64_t j = 0; j < i0; ++j) row[j] = cbi[j] * to_block[j];
      for (int64_t k = 0; k < k_end - i0; ++k) row[i0 + k] = within[i * kRowsMax + k] * cbi[i0 + k];
      from_block[r] = within[i * kRowsMax];
#if MSSM_SSD_BF16
      if (pairs) round_pairs(row, i0, i0 / 2, block_p + r * q_pairs);
#endif
    }
    const float e0 = decay[i0];
    for_column_blocks(P, [&](int64_t j0, int64_t vecs, mask tail) {
      dispatch(rows, vecs, [&](auto r, auto v) {
        constexpr int R = decltype(r)::value, V = decltype(v)::value;
        Acc<R, V> acc;
        acc.zero();
#if MSSM_SSD_BF16
        if (pairs) {
          if (!state_is_zero) {
            acc.accumulate_pairs(n_pairs, c_pairs + i0 * n_pairs, n_pairs, state_p + j0, P, tail);
            acc.scale(e0);
          }
          acc.accumulate_pairs(i0 / 2, block_p, q_pairs, xdt_p + j0, P, tail);
        } else
#endif
        {
          if (!state_is_zero) {
            acc.accumulate(N, Cc + i0 * bc_stride, bc_stride, 1, state + j0, P, tail);
            acc.scale(e0);
          }
          acc.accumulate(i0, block, Q, 1, xdt + j0, P, tail);
        }
        acc.scale_rows(from_block);
        acc.accumulate(k_end - i0, block + i0, Q, 1, xdt + i0 * P + j0, P, tail);
        MSSM_UNROLL for (int rr = 0; rr < R; ++rr) {
          const int64_t i = i0 + rr;
          const float* xi = x + i * x_stride + j0;
          const float* zi = z ? z + i * row_stride + j0 : nullptr;
          float* yi = y + i * row_stride + j0;
          MSSM_UNROLL for (int c = 0; c < V; ++c) {
            const bool last = c == V - 1;
            vec out = acc.v[rr][c];
            if (args.D) out = vfma(vset(Dh), last ? vload_tail(xi + c * kWidth, tail) : vload(xi + c * kWidth), out);
            if (zi) {
              const vec zv = last ? vload_tail(zi + c * kWidth, tail) : vload(zi + c * kWidth);
              out = vmul(out, vdiv(zv, vadd(vset(1.0f), vexp(vmul(zv, vset(-1.0f))))));
            }
            if (last)
              vstore_tail(yi + c * kWidth, out, tail);
            else
              vstore(yi + c * kWidth, out);
          }
        }
      });
    });
  }

  // (3) and (4): S = exp(cum[last])·S + Σ_j B_jᵀ·xw[j], row block by row block of S.
  if (!need_state) return;
  const float chunk_decay = decay[n_tok - 1];
  for (int64_t n0 = 0; n0 < N; n0 += kRowsMax) {
    const int64_t rows = std::min<int64_t>(kRowsMax, N - n0);
    for_column_blocks(P, [&](int64_t j0, int64_t vecs, mask tail) {
      dispatch(rows, vecs, [&](auto r, auto v) {
        constexpr int R = decltype(r)::value, V = decltype(v)::value;
        Acc<R, V> acc;
        float* s = state + n0 * P + j0;
        if (state_is_zero) {
          acc.zero();
        } else {
          const vec cd = vset(chunk_decay);
          MSSM_UNROLL for (int rr = 0; rr < R; ++rr)
            MSSM_UNROLL for (int c = 0; c < V; ++c)
              acc.v[rr][c] = vmul(cd, c == V - 1 ? vload_tail(s + rr * P + c * kWidth, tail)
                                                 : vload(s + rr * P + c * kWidth));
        }
#if MSSM_SSD_BF16
        if (pairs)
          acc.accumulate_pairs((n_tok + 1) / 2, bt_pairs + n0 * q_pairs, q_pairs, xw_p + j0, P, tail);
        else
#endif
          acc.accumulate(n_tok, Bc + n0, 1, bc_stride, xw + j0, P, tail);
        acc.store(s, P, tail);
      });
    });
  }
#else
  float* lseg = scratch.lseg.data();
  for (int64_t i = 0; i < n_tok; ++i) {
    exp_of_differences(cum[i], cum, i + 1, lseg + i * Q);
    for (int64_t j = 0; j <= i; ++j) lseg[i * Q + j] *= cb[i * Q + j];
  }
  for (int64_t i = 0; i < n_tok; ++i) {
    float* yi = y + i * row_stride;
    for (int64_t p = 0; p < P; ++p) {
      float acc = 0.0f;
      if (!state_is_zero) {
        for (int64_t n = 0; n < N; ++n) acc += Cc[i * bc_stride + n] * state[n * P + p];
        acc *= decay[i];
      }
      for (int64_t j = 0; j <= i; ++j) acc += lseg[i * Q + j] * xdt[j * P + p];
      yi[p] = acc;
    }
    finish_row(yi, x + i * x_stride, z ? z + i * row_stride : nullptr, Dh, args.D != nullptr, P,
               scratch.gate.data());
  }
  if (!need_state) return;
  const float chunk_decay = decay[n_tok - 1];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < P; ++p) {
      float acc = state_is_zero ? 0.0f : chunk_decay * state[n * P + p];
      for (int64_t j = 0; j < n_tok; ++j) acc += Bc[j * bc_stride + n] * xw[j * P + p];
      state[n * P + p] = acc;
    }
#endif
}

}  // namespace

void ssd_chunked(const SsdArgs& args) {
  const int64_t batch = args.batch, L = args.length, H = args.heads, P = args.head_dim, N = args.state;
  const int64_t G = args.groups;
  if (G <= 0 || H % G != 0) fail("ssd_chunked: heads must be a multiple of groups");
  if (args.chunk_size <= 0) fail("ssd_chunked: chunk_size must be positive");
  if (args.x_stride < 0 || args.bc_stride < 0) fail("ssd_chunked: strides must not be negative");
  if (batch <= 0 || H <= 0 || P <= 0 || N <= 0) return;
  const int64_t state_size = N * P;
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
  const int64_t window = std::clamp<int64_t>(kWindowFloats / (batch * G * Q * Q), 1, chunks);
  const ChunkRun run{args, L, H, P, N, G, Q, H / G, x_stride_of(args), bc_stride_of(args)};

  // Kept by the calling thread from call to call: fresh buffers of this size would cost a page fault
  // per 4 KiB on every call.
  static thread_local std::vector<float> cb_buffer, state_buffer;
  grow(cb_buffer, batch * window * G * Q * Q);
  grow(state_buffer, batch * H * state_size);
  float* const CB = cb_buffer.data();          // [b, window, G, Q, Q]
  float* const running = state_buffer.data();  // [b, H, N, P] the state of each (b, head), transposed
  // bf16 products: each chunk's C and Bᵀ in bf16 pairs, made once per group in stage A.
  const bool bf16 = MSSM_SSD_BF16 && args.bf16_products;
  const int64_t n_pairs = (N + 1) / 2, q_pairs = (Q + 1) / 2;
  static thread_local std::vector<uint32_t> c_pair_buffer, bt_pair_buffer;
  if (bf16) {
    grow(c_pair_buffer, batch * window * G * Q * n_pairs);
    grow(bt_pair_buffer, batch * window * G * N * q_pairs);
  }
  uint32_t* const c_pairs = bf16 ? c_pair_buffer.data() : nullptr;    // [b, window, G, Q, N/2]
  uint32_t* const bt_pairs = bf16 ? bt_pair_buffer.data() : nullptr;  // [b, window, G, N, Q/2]

  // The state only matters after the last chunk when state_out is wanted.
  const bool keep_final_state = state_out != nullptr;

  for (int64_t c0 = 0; c0 < chunks; c0 += window) {
    const int64_t in_window = std::min(window, chunks - c0);
    auto chunk_start = [&](int64_t w) { return (c0 + w) * Q; };
    auto chunk_length = [&](int64_t w) { return std::min(Q, L - (c0 + w) * Q); };

    // Stage A: C·Bᵀ (lower triangle) once per (b, chunk, group).
    parallel_for(batch * in_window * G, min_items(Q * Q * N / 2), [&](int64_t begin, int64_t end) {
      ChunkScratch& scratch = chunk_scratch();
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / (in_window * G), w = item / G % in_window, g = item % G;
        const int64_t t0 = chunk_start(w);
        const float* Cc = args.C + (b * L + t0) * run.bc_stride + g * N;
        chunk_scores(Cc, args.B + (b * L + t0) * run.bc_stride + g * N, run.bc_stride, chunk_length(w), N, Q,
                     CB + ((b * window + w) * G + g) * Q * Q, scratch.bt);
#if MSSM_SSD_BF16
        if (bf16) {  // chunk_scores left Bᵀ of the chunk in scratch.bt ([N, Q])
          const int64_t item_index = (b * window + w) * G + g;
          uint32_t* cp = c_pairs + item_index * Q * n_pairs;
          uint32_t* bp = bt_pairs + item_index * N * q_pairs;
          for (int64_t i = 0; i < chunk_length(w); ++i)
            round_pairs(Cc + i * run.bc_stride, N, n_pairs, cp + i * n_pairs);
          for (int64_t n = 0; n < N; ++n) round_pairs(scratch.bt.data() + n * Q, chunk_length(w), q_pairs, bp + n * q_pairs);
        }
#endif
      }
    });

    // Stage B: each (b, head) through the window's chunks in order.
    const bool first_window = c0 == 0;
    parallel_for(batch * H, min_items(in_window * Q * P * (2 * N + Q / 2)), [&](int64_t begin, int64_t end) {
      ChunkScratch& scratch = chunk_scratch();
      grow(scratch.cum, Q);
      grow(scratch.dtp, Q);
      grow(scratch.decay, Q);
      grow(scratch.to_end, Q);
#if MSSM_SSD_VECTOR
      grow(scratch.to_block, Q);
      grow(scratch.within, Q * kRowsMax);
      grow(scratch.block, kRowsMax * Q);
#else
      grow(scratch.lseg, Q * Q);
#endif
      grow(scratch.xdt, Q * P);
      grow(scratch.xw, Q * P);
      grow(scratch.gate, P);
#if MSSM_SSD_BF16
      if (bf16) {
        grow(scratch.xdt_pairs, q_pairs * P);
        grow(scratch.xw_pairs, q_pairs * P);
        grow(scratch.state_pairs, n_pairs * P);
        grow(scratch.block_pairs, kRowsMax * q_pairs);
      }
#endif
      // Chunk by chunk over a few heads at a time: a chunk's B, C and C·Bᵀ stay in cache across the
      // heads, and so do the heads' states from one chunk to the next.
      const int64_t heads_at_once = std::max<int64_t>(1, kStateCacheFloats / state_size);
      for (int64_t first = begin; first < end; first += heads_at_once) {
        for (int64_t w = 0; w < in_window; ++w) {
          const bool state_is_zero = first_window && w == 0 && !state_in;
          const bool need_state = c0 + w + 1 < chunks || keep_final_state;
          const bool last = c0 + w + 1 == chunks;
          for (int64_t bh = first; bh < std::min(end, first + heads_at_once); ++bh) {
            const int64_t b = bh / H, h = bh % H;
            float* state = running + bh * state_size;
            // state_in and state_out are read and written here, head by head, where the state is in
            // cache: state_out may alias state_in, and heads are disjoint.
            if (first_window && w == 0 && state_in) transpose(state_in + bh * state_size, N, P, N, state, P);
            const int64_t item_index = (b * window + w) * G + h / (H / G);
            chunk_step(run, b, h, chunk_start(w), chunk_length(w), CB + item_index * Q * Q, state, state_is_zero,
                       need_state, scratch, bf16 ? c_pairs + item_index * Q * n_pairs : nullptr,
                       bf16 ? bt_pairs + item_index * N * q_pairs : nullptr);
            if (last && state_out) transpose(state, P, N, P, state_out + bh * state_size, N);
          }
        }
      }
    });
  }
}

void ssd_step(const SsdArgs& args) {
  if (args.length != 1) fail("ssd_step: length must be 1");
  if (!args.state_out) fail("ssd_step: state_out must be set");
  const int64_t batch = args.batch, H = args.heads, P = args.head_dim, N = args.state, G = args.groups;
  if (G <= 0 || H % G != 0) fail("ssd_step: heads must be a multiple of groups");
  if (args.x_stride < 0 || args.bc_stride < 0) fail("ssd_step: strides must not be negative");
  if (batch <= 0 || H <= 0 || P <= 0 || N <= 0) return;
  const int64_t heads_per_group = H / G;
  const int64_t x_stride = x_stride_of(args), bc_stride = bc_stride_of(args);  // between sequences here

  parallel_for(batch * H, min_items(P * N), [&](int64_t begin, int64_t end) {
    ChunkScratch& scratch = chunk_scratch();
    grow(scratch.gate, P);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / H, h = item % H, g = h / heads_per_group;
      const float dtp = process_dt(args, args.dt[item], h);
      const float decay = std::exp(dtp * args.A[h]);
      const float* Bv = args.B + b * bc_stride + g * N;
      const float* Cv = args.C + b * bc_stride + g * N;
      const float* x = args.x + b * x_stride + h * P;
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
