// Matrix products with weights stored as f32, f16, bf16 or q8_0, and conversions between dtypes.
//
// Glossary (shapes as in kernels.h):
//   M, N, K   y[M,N] = x[M,K] · W[N,K]ᵀ (+ bias[N]): rows of x, output features, input features
//   lanes     floats in one SIMD register at this level (16 AVX-512, 8 AVX2, 4 SSE2 or plain C++)
//   unit      elements decoded from a weight row in one step: one register, or one q8_0 block (32)
//   chains    accumulators per row of x in the direct form (independent FMA chains)
//   MT        rows of x in one tile;  R  weight rows in one panel (panel form)
//   Kp        K rounded up to whole registers
//
// Two paths, chosen by M (and K). Decode (few rows of x, this file) reads each weight row once,
// widens it to f32 in registers and dots it with every row of x, the products summed along K in the
// lanes of a register: bound by reading W for one row of x, by the FMAs for 16. Its two forms:
//   direct  up to 4 rows of x (8 when K < 256): weight rows one after another, decoded in registers
//           (a K of at most 8 whole registers with 1 or 2 rows of x: the short form, unrolled);
//   panel   up to 8 rows (12 for q8_0, 6 for bf16 at avx512bf16; K ≥ 256): a few weight rows decoded
//           to an f32 panel in L1, then register tiles of panel rows × rows of x.
// Prefill (more rows, gemm_prefill.cpp) is bound by arithmetic and works on packed panels of W and x.
#include "gemm_common.h"

namespace mssm::cpu::MSSM_LEVEL {
namespace {
using namespace gemm_detail;

// ---- Decode: few rows of x, each weight row read once ------------------------------------------

// Lane sums of C accumulators: sums[i] = Σ lanes of acc[i], i < C ≤ kLanes. A transpose-add network:
// each step halves the lanes that hold one accumulator and doubles the accumulators per register, so
// kLanes sums cost about as many operations as two separate horizontal sums.
#if defined(__AVX512F__)
template <int C>
inline void lane_sums(const vfloat* acc, float* sums) {
  static_assert(C >= 1 && C <= 16, "at most one register of sums");
  // The network leaves input p's sum in lane 4·(p % 4) + p / 4; input p is fed that accumulator.
  constexpr auto source = [](int p) { return 4 * (p % 4) + p / 4; };
  __m512 in[16], s1[8], s2[4], s3[2];
  bool live[16], live1[8], live2[4], live3[2];
  for (int p = 0; p < 16; ++p) {
    live[p] = source(p) < C;
    in[p] = live[p] ? acc[source(p)] : _mm512_setzero_ps();
  }
  // 1: fold the upper 256 bits of each input onto the lower; inputs 2i and 2i+1 share register i.
  for (int i = 0; i < 8; ++i) {
    live1[i] = live[2 * i] || live[2 * i + 1];
    if (live1[i])
      s1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(in[2 * i], in[2 * i + 1], 0x44),
                            _mm512_shuffle_f32x4(in[2 * i], in[2 * i + 1], 0xEE));
  }
  // 2: 128 bits per input; quarter j of s2[l] holds input 4l + j.
  for (int i = 0; i < 4; ++i) {
    live2[i] = live1[2 * i] || live1[2 * i + 1];
    const __m512 a = live1[2 * i] ? s1[2 * i] : _mm512_setzero_ps();
    const __m512 b = live1[2 * i + 1] ? s1[2 * i + 1] : _mm512_setzero_ps();
    if (live2[i]) s2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  // 3 and 4: within each 128-bit quarter, two lanes per input, then one.
  for (int i = 0; i < 2; ++i) {
    live3[i] = live2[2 * i] || live2[2 * i + 1];
    const __m512 a = live2[2 * i] ? s2[2 * i] : _mm512_setzero_ps();
    const __m512 b = live2[2 * i + 1] ? s2[2 * i + 1] : _mm512_setzero_ps();
    if (live3[i]) s3[i] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
  }
  const __m512 a = live3[0] ? s3[0] : _mm512_setzero_ps(), b = live3[1] ? s3[1] : _mm512_setzero_ps();
  const __m512 total = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
  if constexpr (C == 16) {
    _mm512_storeu_ps(sums, total);
  } else {
    _mm512_mask_storeu_ps(sums, (__mmask16)((1u << C) - 1), total);
  }
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
template <int C>
inline void lane_sums(const vfloat* acc, float* sums) {
  static_assert(C >= 1 && C <= 8, "at most one register of sums");
  // The network leaves input p's sum in lane 4·(p % 2) + p / 2; input p is fed that accumulator.
  constexpr auto source = [](int p) { return 4 * (p % 2) + p / 2; };
  __m256 in[8], s1[4], s2[2];
  for (int p = 0; p < 8; ++p) in[p] = source(p) < C ? acc[source(p)] : _mm256_setzero_ps();
  // 1: 128 bits per input, inputs 2i and 2i+1 in the two halves of s1[i].
  for (int i = 0; i < 4; ++i)
    s1[i] = _mm256_add_ps(_mm256_permute2f128_ps(in[2 * i], in[2 * i + 1], 0x20),
                          _mm256_permute2f128_ps(in[2 * i], in[2 * i + 1], 0x31));
  // 2 and 3: within each half, two lanes per input, then one.
  for (int i = 0; i < 2; ++i)
    s2[i] = _mm256_add_ps(_mm256_shuffle_ps(s1[2 * i], s1[2 * i + 1], 0x44),
                          _mm256_shuffle_ps(s1[2 * i], s1[2 * i + 1], 0xEE));
  const __m256 total = _mm256_add_ps(_mm256_shuffle_ps(s2[0], s2[1], 0x88), _mm256_shuffle_ps(s2[0], s2[1], 0xDD));
  if constexpr (C == 8) {
    _mm256_storeu_ps(sums, total);
  } else {
    float all[8];
    _mm256_storeu_ps(all, total);
    for (int i = 0; i < C; ++i) sums[i] = all[i];
  }
}
#elif defined(__SSE2__)
template <int C>
inline void lane_sums(const vfloat* acc, float* sums) {
  static_assert(C >= 1 && C <= 4, "at most one register of sums");
  __m128 in[4];
  for (int p = 0; p < 4; ++p) in[p] = p < C ? acc[p] : _mm_setzero_ps();
  const __m128 s0 = _mm_add_ps(_mm_shuffle_ps(in[0], in[1], 0x44), _mm_shuffle_ps(in[0], in[1], 0xEE));
  const __m128 s1 = _mm_add_ps(_mm_shuffle_ps(in[2], in[3], 0x44), _mm_shuffle_ps(in[2], in[3], 0xEE));
  const __m128 total = _mm_add_ps(_mm_shuffle_ps(s0, s1, 0x88), _mm_shuffle_ps(s0, s1, 0xDD));
  float all[4];
  _mm_storeu_ps(all, total);
  for (int i = 0; i < C; ++i) sums[i] = all[i];
}
#else
template <int C>
inline void lane_sums(const vfloat* acc, float* sums) {
  for (int i = 0; i < C; ++i) sums[i] = vsum(acc[i]);
}
#endif

// Sums of any count of accumulators, one register of sums at a time.
template <int C>
inline void all_lane_sums(const vfloat* acc, float* sums) {
  if constexpr (C > kLanes) {
    lane_sums<kLanes>(acc, sums);
    all_lane_sums<C - kLanes>(acc + kLanes, sums + kLanes);
  } else {
    lane_sums<C>(acc, sums);
  }
}

// ---- Few rows of x: one weight row at a time ----
// Weight rows are read one after another, which keeps the stream sequential for the hardware
// prefetcher (interleaving several rows measured up to 3× slower from DRAM for 16- and 8-bit
// weights). Each register of a weight row is decoded once and dotted with the MT rows of x of a tile.
//
// The order of the sums is fixed whatever the number of rows of x, so that a row of x gets the same
// result alone or in a batch: register v of the row (v = k / kLanes; a partial last register is zero-
// padded) goes to accumulator v % kChains, the accumulators are added in order (((a0 + a1) + a2) + …),
// and the lanes are summed by lane_sums, whose order for one accumulator does not depend on the
// others. The chains also hide the FMA latency with a single row of x.
//
// Rows of x per tile: kChains accumulators each, plus a weight and an x register.
#if defined(__AVX512F__)
constexpr int kChains = 4, kDirectTile = 4;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int kChains = 4, kDirectTile = 2;
#else  // no FMA: a multiply and a dependent add per step, eight chains to cover the add's latency
constexpr int kChains = 8, kDirectTile = 1;
#endif

// out[m] = a register whose lanes sum to x[m, 0:K] · W[row], m < MT (x rows K apart).
template <DType T, int MT>
void row_dots(const float* x, int64_t K, const uint8_t* row, vfloat* out) {
  using F = Format<T>;
  vfloat acc[MT][kChains];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < kChains; ++a) acc[m][a] = vzero();
  // Weight register wv, of elements [k, k + kLanes), into accumulator a.
  auto step = [&](const vfloat& wv, int64_t k, int a) {
    for (int m = 0; m < MT; ++m) acc[m][a] = vfma(wv, vload(x + m * K + k), acc[m][a]);
  };
  if constexpr (T == DType::q8_0) {
    // K is a multiple of 32. The weights are dequantised exactly (q · d, as the prefill path and the
    // reference read them). Blocks go by `per_step`, so that each register's accumulator is known at
    // compile time: register j of block i of a step is register i·vectors + j of the step.
    constexpr int vectors = (int)(kQ8BlockSize / kLanes);
    constexpr int per_step = vectors >= kChains ? 1 : kChains / vectors;
    const BlockQ8_0* blocks = (const BlockQ8_0*)row;
    const int64_t count = K / kQ8BlockSize;
    auto block = [&](int64_t b, int i) {
      const vfloat scale = vbroadcast(scale_to_float(blocks[b].d));
      for (int j = 0; j < vectors; ++j)
        step(vmul(vload_q8(blocks[b].qs + j * kLanes), scale), b * kQ8BlockSize + j * kLanes,
             (i * vectors + j) % kChains);
    };
    int64_t b = 0;
    for (; b + per_step <= count; b += per_step)
      for (int i = 0; i < per_step; ++i) block(b + i, i);
    for (int i = 0; i < per_step; ++i)
      if (b + i < count) block(b + i, i);
  } else {
    int64_t k = 0;
    for (; k + kChains * kLanes <= K; k += kChains * kLanes)
      for (int a = 0; a < kChains; ++a) {
        vfloat wv;
        F::load(row, k + a * kLanes, &wv);
        step(wv, k + a * kLanes, a);
      }
    // Up to kChains - 1 whole registers, then a partial one, continuing the accumulator sequence.
    for (int a = 0; a < kChains; ++a) {
      if (k + kLanes <= K) {
        vfloat wv;
        F::load(row, k, &wv);
        step(wv, k, a);
        k += kLanes;
      } else if (k < K) {
        alignas(64) float tail[kLanes];
        for (int i = 0; i < kLanes; ++i) tail[i] = k + i < K ? F::element(row, k + i) : 0.0f;
        const vfloat wv = vload(tail);
        for (int m = 0; m < MT; ++m) {
          for (int i = 0; i < kLanes; ++i) tail[i] = k + i < K ? x[m * K + k + i] : 0.0f;
          acc[m][a] = vfma(wv, vload(tail), acc[m][a]);
        }
        break;
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    vfloat total = acc[m][0];
    for (int a = 1; a < kChains; ++a) total = vadd(total, acc[m][a]);
    out[m] = total;
  }
}

// Up to this many rows of x the direct form is used, and up to kDirectMaxRowsShallow when K is below
// kPanelMinDepth; beyond, the panel form below (or the prefill path). (Measured at K = 768 and 3072:
// the direct form is ahead up to 4 rows, behind or erratic from 6.)
constexpr int64_t kDirectMaxRows = 4;
constexpr int64_t kDirectMaxRowsShallow = 8;
constexpr int64_t kPanelMinDepth = 256;

// row_dots over the M rows of x in tiles of kDirectTile: out[m] for m < M.
template <DType T, int M, int M0 = 0>
inline void direct_tiles(const float* x, int64_t K, const uint8_t* row, vfloat* out) {
  if constexpr (M0 < M) {
    constexpr int mt = std::min(kDirectTile, M - M0);
    row_dots<T, mt>(x + M0 * K, K, row, out + M0);
    direct_tiles<T, M, M0 + mt>(x, K, row, out);
  }
}

// y[0:M, n] = Σ lanes of out[m] + bias[n] for n in [n_begin, n_end), where dots(n, out) leaves in
// out[m] the register of row m of x with weight row n.
template <int M, typename Dots>
void direct_rows(const Dots& dots, const float* bias, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  vfloat pending[M][kLanes];  // pending[m][i]: weight row n0 + i, row m of x
  alignas(64) float sums[kLanes];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kLanes) {
    const int count = (int)std::min<int64_t>(kLanes, n_end - n0);
    for (int i = 0; i < count; ++i) {
      vfloat out[M];
      dots(n0 + i, out);
      for (int m = 0; m < M; ++m) pending[m][i] = out[m];
    }
    for (int m = 0; m < M; ++m) {
      for (int i = count; i < kLanes; ++i) pending[m][i] = vzero();
      lane_sums<kLanes>(pending[m], sums);
      for (int i = 0; i < count; ++i) y[m * N + n0 + i] = sums[i] + (bias ? bias[n0 + i] : 0.0f);
    }
  }
}

// direct_rows over all N rows on the pool: each thread's share in chunks of about kDirectChunkBytes
// of weights (whole groups of kLanes rows), and a thread that finishes early takes chunks from the
// other's end. Each row's result is the same whichever thread computes it.
constexpr int64_t kDirectChunkBytes = 32 << 10;

template <int M, typename Dots>
void direct_parallel(const Dots& dots, const float* bias, float* y, int64_t N, int64_t row_bytes, int64_t min_rows) {
  const int64_t chunk = kLanes * std::max<int64_t>(1, kDirectChunkBytes / (kLanes * row_bytes));
  parallel_for_dynamic(N, min_rows, chunk,
                       [&](int64_t begin, int64_t end) { direct_rows<M>(dots, bias, y, N, begin, end); });
}

// ---- Short rows: K a whole number of registers, at most kShortMaxRegisters ----
// For a short K (dt_proj's rank, 48 in mamba-130m) row_dots' loop and call cost more than its products.
// Here the rows of x stay in registers and each weight row takes KR loads and products, unrolled; the
// products go to the same accumulators in the same order as row_dots (register v into v % kChains,
// then ((a0 + a1) + a2) + …), so the results are the same bit for bit.
constexpr int kShortMaxRegisters = 8, kShortMaxRowsX = 2;

template <DType T, int M, int KR>
inline void short_dots(const vfloat (&xv)[M][KR], const uint8_t* row, vfloat* out) {
  // (Each accumulator starts from an FMA onto zero as in row_dots, not a product: a product followed
  // by an add may be contracted into one FMA, which rounds differently.)
  constexpr int C = KR < kChains ? KR : kChains;
  vfloat acc[M][C];
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < C; ++a) acc[m][a] = vzero();
  for (int v = 0; v < KR; ++v) {
    vfloat wv;
    Format<T>::load(row, v * kLanes, &wv);
    for (int m = 0; m < M; ++m) acc[m][v % kChains] = vfma(wv, xv[m][v], acc[m][v % kChains]);
  }
  for (int m = 0; m < M; ++m) {
    vfloat total = acc[m][0];
    for (int a = 1; a < C; ++a) total = vadd(total, acc[m][a]);
    out[m] = total;
  }
}

template <DType T, int M, int KR>
void short_form(const float* x, const uint8_t* w, const float* bias, float* y, int64_t N, int64_t min_rows) {
  const int64_t row_bytes = Format<T>::row_bytes(KR * kLanes);
  vfloat xv[M][KR];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < KR; ++v) xv[m][v] = vload(x + (m * KR + v) * kLanes);
  auto dots = [&](int64_t n, vfloat* out) { short_dots<T, M, KR>(xv, w + n * row_bytes, out); };
  direct_parallel<M>(dots, bias, y, N, row_bytes, min_rows);
}

// short_form for KR = K / kLanes known only at run time; false when K is not short.
template <DType T, int M, int KR = kShortMaxRegisters>
inline bool short_form_upto(int64_t K, const float* x, const uint8_t* w, const float* bias, float* y, int64_t N,
                            int64_t min_rows) {
  if constexpr (KR >= 1) {
    if (K == KR * kLanes) {
      short_form<T, M, KR>(x, w, bias, y, N, min_rows);
      return true;
    }
    return short_form_upto<T, M, KR - 1>(K, x, w, bias, y, N, min_rows);
  }
  return false;
}

// ---- q8_0 with int8 dot products (VNNI), few rows of x ----
// The rows of x are quantised once per call, like the weights: per block of 32, d = max|x| / 127 (kept
// in f32) and q = round(x / d). A block's dot product is then Σ w·q in int32, exact, times d_w · d_x.
// This rounds the activations to 8 bits — a relative error of about 0.5% per element and of the
// output's RMS — where the f32 paths use x as given. It measured 1.7–2× the f32 path's throughput
// with one thread (q8_0, 1 to 4 rows of x, cache-resident), which lets one row of x keep up with DRAM
// where the f32 path does not. matmul_step takes it (a decode step, as llama.cpp quantises the
// activations of its q8_0 products); matmul does not, so that a prefill computes with x as given.
// vpdpbusd multiplies unsigned by signed bytes: the weights are offset to unsigned (w ^ 0x80 = w + 128)
// and each accumulator starts at −128 · Σq over its four bytes, which cancels the offset exactly. Two
// blocks fill one register (lanes 0–7 and 8–15).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr bool kHaveInt8Products = true;
struct QuantizedX {
  const int8_t* q;        // [M][K]
  const int32_t* offset;  // [M][pairs][16]: −128 · Σ of the four q bytes each lane multiplies
  const float* scale;     // [M][pairs][16]: d_x of the pair's first block in lanes 0–7, second in 8–15
  int64_t K, pairs;       // pairs of blocks per row, the last one possibly single
};

inline thread_local Scratch t_quantized_x;

QuantizedX quantize_x(const float* x, int64_t M, int64_t K) {
  const int64_t blocks = K / kQ8BlockSize, pairs = (blocks + 1) / 2;
  const int64_t q_floats = (M * K + 63) / 64 * 16;  // q bytes, rounded up to whole cache lines
  float* storage = t_quantized_x.get(q_floats + 2 * M * pairs * 16);
  int8_t* q = (int8_t*)storage;
  int32_t* offset = (int32_t*)(storage + q_floats);
  float* scale = storage + q_floats + M * pairs * 16;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = x + m * K + b * kQ8BlockSize;
      const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      // x / d rather than x · (1/d): 1/d overflows when d is subnormal. A block holding a NaN or an
      // infinity gets q = 0 and d = NaN, so that the outputs it reaches are NaN, as with the f32 paths.
      float d = amax / 127.0f;
      constexpr int kNonFinite = 0x01 | 0x08 | 0x10 | 0x80;  // QNaN, +inf, -inf, SNaN
      int8_t* qb = q + m * K + b * kQ8BlockSize;
      if ((_mm512_fpclass_ps_mask(v0, kNonFinite) | _mm512_fpclass_ps_mask(v1, kNonFinite)) != 0) {
        d = NAN;
        _mm256_storeu_si256((__m256i*)qb, _mm256_setzero_si256());
      } else {
        const __m512 divisor = _mm512_set1_ps(d > 0.0f ? d : 1.0f);
        _mm_storeu_si128((__m128i*)qb, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(v0, divisor))));
        _mm_storeu_si128((__m128i*)(qb + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(v1, divisor))));
      }
      _mm256_storeu_ps(scale + (m * pairs + b / 2) * 16 + (b % 2) * 8, _mm256_set1_ps(d));
    }
    for (int64_t p = 0; p < pairs; ++p) {
      const __mmask64 valid = 2 * p + 1 < blocks ? ~(__mmask64)0 : (__mmask64)0xffffffffu;
      const __m512i bytes = _mm512_maskz_loadu_epi8(valid, q + m * K + p * 2 * kQ8BlockSize);
      const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), bytes);
      _mm512_storeu_si512(offset + (m * pairs + p) * 16, _mm512_mullo_epi32(sums, _mm512_set1_epi32(-128)));
    }
  }
  return {q, offset, scale, K, pairs};
}

// out[m] = a register whose lanes sum to x[m0 + m] · W[row] for m < MT, from the quantised x.
template <int MT>
void row_dots_vnni(const QuantizedX& qx, int64_t m0, const uint8_t* row, vfloat* out) {
  constexpr int A = 4;  // accumulators per row of x, whatever MT: a row's result does not depend on MT
  const BlockQ8_0* blocks = (const BlockQ8_0*)row;
  const int64_t full_pairs = qx.K / (2 * kQ8BlockSize);
  const __m512i offset_bytes = _mm512_set1_epi8((char)0x80);
  __m512 acc[MT][A];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
  auto pair_step = [&](int64_t p, int a) {
    const BlockQ8_0* blk = blocks + 2 * p;
    __m512i w = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)blk[0].qs));
    w = _mm512_xor_si512(_mm512_inserti64x4(w, _mm256_loadu_si256((const __m256i*)blk[1].qs), 1), offset_bytes);
    const __m512 dw = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16((short)blk[0].d)),
                                                              _mm_set1_epi16((short)blk[1].d), 1));
    for (int m = 0; m < MT; ++m) {
      const int64_t at = ((m0 + m) * qx.pairs + p) * 16;
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(qx.offset + at), w,
                                              _mm512_loadu_si512(qx.q + (m0 + m) * qx.K + p * 2 * kQ8BlockSize));
      const __m512 scale = _mm512_mul_ps(dw, _mm512_loadu_ps(qx.scale + at));
      acc[m][a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[m][a]);
    }
  };
  int64_t p = 0;
  for (; p + A <= full_pairs; p += A)
    for (int a = 0; a < A; ++a) pair_step(p + a, a);
  for (; p < full_pairs; ++p) pair_step(p, 0);
  for (int m = 0; m < MT; ++m) {
    __m512 total = acc[m][0];
    for (int a = 1; a < A; ++a) total = _mm512_add_ps(total, acc[m][a]);
    out[m] = total;
  }
  if (p < qx.pairs) {  // an odd last block, in lanes 0–7
    const BlockQ8_0* blk = blocks + 2 * p;
    const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)blk->qs), _mm256_set1_epi8((char)0x80));
    const __m256 dw = _mm256_set1_ps(scale_to_float(blk->d));
    for (int m = 0; m < MT; ++m) {
      const int64_t at = ((m0 + m) * qx.pairs + p) * 16;
      const int8_t* q = qx.q + (m0 + m) * qx.K + p * 2 * kQ8BlockSize;
      const __m256i dot = _mm256_dpbusd_epi32(_mm256_loadu_si256((const __m256i*)(qx.offset + at)), w,
                                              _mm256_loadu_si256((const __m256i*)q));
      const __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw, _mm256_loadu_ps(qx.scale + at)));
      out[m] = _mm512_add_ps(out[m], _mm512_zextps256_ps512(part));
    }
  }
}

// row_dots_vnni over the M rows of x in tiles of kDirectTile: out[m] for m < M.
template <int M, int M0 = 0>
inline void direct_tiles_vnni(const QuantizedX& qx, const uint8_t* row, vfloat* out) {
  if constexpr (M0 < M) {
    constexpr int mt = std::min(kDirectTile, M - M0);
    row_dots_vnni<mt>(qx, M0, row, out + M0);
    direct_tiles_vnni<M, M0 + mt>(qx, row, out);
  }
}
#else
constexpr bool kHaveInt8Products = false;
#endif

// ---- Several rows of x ----
// R weight rows at a time are decoded, one after another (a sequential read), into an f32 panel in
// per-thread scratch that stays in L1; then R × MT tiles of y are computed from the panel and MT rows
// of x, with R·MT accumulators, R weight registers and one of x in registers: each weight is decoded
// once, and each weight register loaded serves MT rows of x. Panel rows and x rows are Kp = K rounded
// up to kLanes long, zero-padded, so the tile kernel has no tail. (Decoding the next panel between
// or inside the tiles of this one, to overlap the two, measured slower.) One accumulator per output:
// the sums are in another order than the direct form's, so a row of x batched here may differ from
// the same row alone in the last bits.
#if defined(__AVX512F__)
constexpr int kPanelRows = 4, kTileRowsX = 6;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int kPanelRows = 2, kTileRowsX = 4;
#else
constexpr int kPanelRows = 2, kTileRowsX = 4;
#endif

// sums[m·R + r] = x[m, 0:Kp] · panel[r, 0:Kp] (x rows ldx apart, panel rows ldp apart).
template <int R, int MT>
void panel_tile(const float* x, int64_t ldx, const float* panel, int64_t ldp, int64_t Kp, float* sums) {
  vfloat acc[MT * R];
  for (int i = 0; i < MT * R; ++i) acc[i] = vzero();
  for (int64_t k = 0; k < Kp; k += kLanes) {
    vfloat wv[R];
    for (int r = 0; r < R; ++r) wv[r] = vload(panel + r * ldp + k);
    for (int m = 0; m < MT; ++m) {
      const vfloat xv = vload(x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m * R + r] = vfma(wv[r], xv, acc[m * R + r]);
    }
  }
  all_lane_sums<MT * R>(acc, sums);
}

// panel_tile<R, mt> for a count mt ≤ MT known only at run time.
template <int R, int MT>
inline void panel_tile_upto(int mt, const float* x, int64_t ldx, const float* panel, int64_t ldp, int64_t Kp,
                            float* sums) {
  if constexpr (MT > 1) {
    if (mt < MT) return panel_tile_upto<R, MT - 1>(mt, x, ldx, panel, ldp, Kp, sums);
  }
  panel_tile<R, MT>(x, ldx, panel, ldp, Kp, sums);
}

// y[0:M, n] = x · W[n]ᵀ + bias for n in [n_begin, n_end); x rows are Kp apart (Kp ≥ K, zero-padded).
template <DType T>
void matmul_rows(const float* x, int64_t Kp, const uint8_t* w, const float* bias, float* y, int64_t M, int64_t N,
                 int64_t K, int64_t n_begin, int64_t n_end) {
  constexpr int R = kPanelRows;
  const int64_t row_bytes = Format<T>::row_bytes(K);
  // Panel rows one register longer than Kp: rows a multiple of 4 KiB apart would share L1 sets.
  const int64_t ldp = Kp + kLanes;
  float* panel = t_scratch.get(R * ldp);
  float sums[kTileRowsX * R];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += R) {
    const int rows = (int)std::min<int64_t>(R, n_end - n0);
    for (int r = 0; r < R; ++r) {
      float* p = panel + r * ldp;
      if (r < rows) {
        decode_row<T>(w + (n0 + r) * row_bytes, 0, K, p);
        std::fill(p + K, p + Kp, 0.0f);
      } else {
        std::fill(p, p + Kp, 0.0f);
      }
    }
    for (int64_t m0 = 0; m0 < M; m0 += kTileRowsX) {
      const int mt = (int)std::min<int64_t>(kTileRowsX, M - m0);
      panel_tile_upto<R, kTileRowsX>(mt, x + m0 * Kp, Kp, panel, ldp, Kp, sums);
      for (int m = 0; m < mt; ++m)
        for (int r = 0; r < rows; ++r) y[(m0 + m) * N + n0 + r] = sums[m * R + r] + (bias ? bias[n0 + r] : 0.0f);
    }
  }
}

// x copied with rows Kp apart and zero padding, when K is not a multiple of kLanes.
inline thread_local Scratch t_padded_x;

// The direct form for M rows of x, over all N weight rows split across the pool; Int8: q8_0 weights
// with int8 products (levels with VNNI only).
template <DType T, int M, bool Int8 = false>
void direct_form(const float* x, const uint8_t* w, const float* bias, float* y, int64_t N, int64_t K,
                 int64_t min_rows) {
  const int64_t row_bytes = Format<T>::row_bytes(K);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (Int8) {
    static_assert(T == DType::q8_0, "int8 products are for q8_0 weights");
    const QuantizedX qx = quantize_x(x, M, K);
    auto dots = [&](int64_t n, vfloat* out) { direct_tiles_vnni<M>(qx, w + n * row_bytes, out); };
    direct_parallel<M>(dots, bias, y, N, row_bytes, min_rows);
    return;
  }
#endif
  if constexpr (T != DType::q8_0 && M <= kShortMaxRowsX) {
    if (short_form_upto<T, M>(K, x, w, bias, y, N, min_rows)) return;
  }
  auto dots = [&](int64_t n, vfloat* out) { direct_tiles<T, M>(x, K, w + n * row_bytes, out); };
  direct_parallel<M>(dots, bias, y, N, row_bytes, min_rows);
}

template <DType T, int MMax, bool Int8 = false>
inline void direct_form_upto(int m, const float* x, const uint8_t* w, const float* bias, float* y, int64_t N,
                             int64_t K, int64_t min_rows) {
  if constexpr (MMax > 1) {
    if (m < MMax) return direct_form_upto<T, MMax - 1, Int8>(m, x, w, bias, y, N, K, min_rows);
  }
  direct_form<T, MMax, Int8>(x, w, bias, y, N, K, min_rows);
}

// Weight bytes below which a thread is not worth waking on the decode path: a parallel_for costs
// about 1 µs here, and a thread streams about 25 GB/s from DRAM.
constexpr int64_t kMinBytesPerThread = 32 << 10;

// Rows per thread on the decode path: enough weight bytes to stream or enough products to compute,
// whichever comes first.
inline int64_t decode_min_rows(int64_t M, int64_t K, int64_t row_bytes) {
  return std::max<int64_t>(1, std::min(kMinBytesPerThread / std::max<int64_t>(1, row_bytes),
                                       kMinWorkPerThread / std::max<int64_t>(1, M * K)));
}

// int8: q8_0 weights in the direct form quantise x (int8 products), where the level has them.
template <DType T>
void decode(const float* x, const uint8_t* w, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
            bool int8) {
  const int64_t min_rows = decode_min_rows(M, K, Format<T>::row_bytes(K));
  if (M <= kDirectMaxRows || (M <= kDirectMaxRowsShallow && K < kPanelMinDepth)) {
    if constexpr (T == DType::q8_0 && kHaveInt8Products) {
      if (int8) {
        direct_form_upto<T, kDirectMaxRowsShallow, true>((int)M, x, w, bias, y, N, K, min_rows);
        return;
      }
    }
    direct_form_upto<T, kDirectMaxRowsShallow>((int)M, x, w, bias, y, N, K, min_rows);
    return;
  }
  const int64_t Kp = (K + kLanes - 1) / kLanes * kLanes;
  const float* xp = x;
  if (Kp != K) {
    float* padded = t_padded_x.get(M * Kp);
    for (int64_t m = 0; m < M; ++m) {
      std::memcpy(padded + m * Kp, x + m * K, K * sizeof(float));
      std::fill(padded + m * Kp + K, padded + (m + 1) * Kp, 0.0f);
    }
    xp = padded;
  }
  const int64_t groups = (N + kPanelRows - 1) / kPanelRows;
  const int64_t min_groups = (min_rows + kPanelRows - 1) / kPanelRows;
  parallel_for(groups, min_groups, [&](int64_t begin, int64_t end) {
    matmul_rows<T>(xp, Kp, w, bias, y, M, N, K, begin * kPanelRows, std::min(N, end * kPanelRows));
  });
}

// The decode path's limits, measured against the prefill path of gemm_prefill.cpp (one thread,
// cache-resident weights, K = 384, 768 and 1536): the panel form is ahead up to 16 rows of x for f32
// and f16 and 12 for q8_0 (at 24 and 16 rows the two are within ~10%), and for bf16 at levels whose
// prefill path has BF16 dot products (avx512bf16) up to 6 rows (behind from 8); and from a depth of
// kPanelMinDepth, below which its lane sums cost more than the products and the prefill path's
// broadcast form wins (2–3× at K = 48 and 96). With the weights streamed from DRAM, as in a decode
// step, the prefill path was ahead at 16 rows for f32 and f16 too (a 16-sequence step of mamba-130m:
// f32 6 of 7 alternating runs, by 2–20%; f16 4 of 4, by 6–16%), so both switch to it above 8 rows.
template <DType T>
constexpr int64_t decode_max_rows() {
#if defined(__AVX512BF16__)
  if (T == DType::bf16) return 6;
#endif
  return T == DType::q8_0 ? 12 : 8;
}
// step: matmul_step's products (q8_0 at avx512bf16: int8 x in the few-row forms, bf16 w and x in the
// many-row path).
template <DType T>
void matmul_typed(const float* x, const void* w_any, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                  bool step) {
  const uint8_t* w = static_cast<const uint8_t*>(w_any);
  if (M <= kDirectMaxRows || (K < kPanelMinDepth ? M <= kDirectMaxRowsShallow : M <= decode_max_rows<T>())) {
    decode<T>(x, w, bias, y, M, N, K, step);
    return;
  }
  if (step)
    gemm_step(x, w, T, bias, y, M, N, K);
  else
    gemm_prefill(x, w, T, bias, y, M, N, K);
}

void quantize_q8_0(const float* src, BlockQ8_0* dst, int64_t blocks) {
  for (int64_t b = 0; b < blocks; ++b) {
    const float* v = src + b * kQ8BlockSize;
    float amax = 0.0f;
    for (int i = 0; i < kQ8BlockSize; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float d = amax / 127.0f;
    const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
    dst[b].d = f32_to_f16(d);
    for (int i = 0; i < kQ8BlockSize; ++i) dst[b].qs[i] = (int8_t)std::round(v[i] * inverse);
  }
}

void encode_f16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  // The hardware rounds to nearest even as f32_to_f16 does; NaN payloads differ, so a group holding a
  // NaN takes the scalar path.
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(src + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) {
      for (int j = 0; j < 8; ++j) dst[i + j] = f32_to_f16(src[i + j]);
    } else {
      _mm_storeu_si128((__m128i*)(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}

void encode_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

void decode_to_f32(const void* src, DType dtype, float* dst, int64_t n) {
  const uint8_t* bytes = static_cast<const uint8_t*>(src);
  switch (dtype) {
    case DType::f32: std::memcpy(dst, src, n * sizeof(float)); return;
    case DType::f16: decode_row<DType::f16>(bytes, 0, n, dst); return;
    case DType::bf16: decode_row<DType::bf16>(bytes, 0, n, dst); return;
    case DType::q8_0: decode_row<DType::q8_0>(bytes, 0, n, dst); return;
    default: break;
  }
  std::fprintf(stderr, "mamba-ssm: convert: cannot read %s as f32\n", dtype_name(dtype));
  std::abort();
}

void encode_from_f32(const float* src, DType dtype, void* dst, int64_t n) {
  switch (dtype) {
    case DType::f32: std::memcpy(dst, src, n * sizeof(float)); return;
    case DType::f16: encode_f16(src, static_cast<uint16_t*>(dst), n); return;
    case DType::bf16: encode_bf16(src, static_cast<uint16_t*>(dst), n); return;
    case DType::q8_0: quantize_q8_0(src, static_cast<BlockQ8_0*>(dst), n / kQ8BlockSize); return;
    default: break;
  }
  std::fprintf(stderr, "mamba-ssm: convert: cannot write %s from f32\n", dtype_name(dtype));
  std::abort();
}

// Elements per parallel chunk of a conversion (a multiple of the q8_0 block).
constexpr int64_t kConvertChunk = 1 << 16;

}  // namespace

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
namespace gemm_detail {
// y[M,N] = x · Wᵀ (+ bias) for q8_0 W (K % 32 == 0) with the rows of x quantised to int8 and int8
// products, for any number of rows: the direct form, 8 rows of x at a time.
void matmul_q8_0_int8(const float* x, const void* w_any, const float* bias, float* y, int64_t M, int64_t N,
                      int64_t K) {
  const uint8_t* w = static_cast<const uint8_t*>(w_any);
  const int64_t min_rows = decode_min_rows(std::min<int64_t>(M, kDirectMaxRowsShallow), K,
                                           Format<DType::q8_0>::row_bytes(K));
  for (int64_t m0 = 0; m0 < M; m0 += kDirectMaxRowsShallow)
    direct_form_upto<DType::q8_0, kDirectMaxRowsShallow, true>((int)std::min<int64_t>(kDirectMaxRowsShallow, M - m0),
                                                               x + m0 * K, w, bias, y + m0 * N, N, K, min_rows);
}
}  // namespace gemm_detail
#endif

namespace {
void matmul_any(const float* x, const void* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N,
                int64_t K, bool step) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] = bias ? bias[n] : 0.0f;
    return;
  }
  switch (w_dtype) {
    case DType::f32: matmul_typed<DType::f32>(x, w, bias, y, M, N, K, step); return;
    case DType::f16: matmul_typed<DType::f16>(x, w, bias, y, M, N, K, step); return;
    case DType::bf16: matmul_typed<DType::bf16>(x, w, bias, y, M, N, K, step); return;
    case DType::q8_0:
      if (K % kQ8BlockSize != 0) {
        std::fprintf(stderr, "mamba-ssm: matmul: q8_0 weights need K %% 32 == 0 (K = %lld)\n", (long long)K);
        std::abort();
      }
      matmul_typed<DType::q8_0>(x, w, bias, y, M, N, K, step);
      return;
    default: break;
  }
  std::fprintf(stderr, "mamba-ssm: matmul: unsupported weight dtype %s\n", dtype_name(w_dtype));
  std::abort();
}
}  // namespace

void matmul(const float* x, const void* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  matmul_any(x, w, w_dtype, bias, y, M, N, K, false);
}

void matmul_step(const float* x, const void* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N,
                 int64_t K) {
  matmul_any(x, w, w_dtype, bias, y, M, N, K, true);
}

void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n) {
  if (n <= 0) return;
  if ((src_dtype == DType::q8_0 || dst_dtype == DType::q8_0) && n % kQ8BlockSize != 0) {
    std::fprintf(stderr, "mamba-ssm: convert: q8_0 needs a multiple of 32 elements (n = %lld)\n", (long long)n);
    std::abort();
  }
  if (src_dtype == dst_dtype) {
    std::memcpy(dst, src, dtype_bytes(src_dtype, n));
    return;
  }
  const uint8_t* in = static_cast<const uint8_t*>(src);
  uint8_t* out = static_cast<uint8_t*>(dst);
  const int64_t chunks = (n + kConvertChunk - 1) / kConvertChunk;
  parallel_for(chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * kConvertChunk, count = std::min(kConvertChunk, n - first);
      const void* from = in + dtype_bytes(src_dtype, first);
      void* to = out + dtype_bytes(dst_dtype, first);
      if (src_dtype == DType::f32) {
        encode_from_f32(static_cast<const float*>(from), dst_dtype, to, count);
      } else if (dst_dtype == DType::f32) {
        decode_to_f32(from, src_dtype, static_cast<float*>(to), count);
      } else {  // between two narrow dtypes, through f32
        float* wide = t_scratch.get(kConvertChunk);
        decode_to_f32(from, src_dtype, wide, count);
        encode_from_f32(wide, dst_dtype, to, count);
      }
    }
  });
}

}  // namespace mssm::cpu::MSSM_LEVEL
