// The prefill path of matmul: many rows of x, bound by FMAs. Panels of W are widened to f32 and packed
// k-major into per-thread scratch, panels of x likewise, and an MR × NR block of accumulators stays in
// registers over each KC-deep panel, so every weight dtype runs at the f32 FMA rate.
#include "gemm_common.h"

namespace mssm::cpu::MSSM_LEVEL {
namespace gemm_detail {
namespace {

// ---- Prefill: packed panels and a register-blocked micro-kernel --------------------------------
constexpr int NR = 2 * kLanes;
#if defined(__AVX512F__)
constexpr int MR = 8;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int MR = 6;
#else
constexpr int MR = 4;
#endif
constexpr int64_t KC = 256;
constexpr int64_t MC = 24 * MR;    // a packed block of x: MC × KC floats, kept in L2
constexpr int64_t NC = 32 * NR;    // a packed block of W: NC × KC floats, read strip by strip


// W rows [n0, n0 + count) × k [k0, k0 + kc) as strips of NR rows, each strip k-major: strip s holds
// packed[s·kc·NR + k·NR + j] = W[n0 + s·NR + j, k0 + k], zero past the last row.
// The rows are first decoded into `rows` at a stride of kRowStride floats, which is not a multiple of
// 1 KiB so that reading down a column does not map every row to the same few L1 sets.
constexpr int64_t kRowStride = KC + 16;

template <DType T>
void pack_weights(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t count, int64_t k0, int64_t kc,
                  float* packed, float* rows) {
  for (int64_t s = 0; s * NR < count; ++s) {
    const int64_t valid = std::min<int64_t>(NR, count - s * NR);
    for (int64_t j = 0; j < valid; ++j)
      decode_row<T>(w + (n0 + s * NR + j) * row_bytes, k0, kc, rows + j * kRowStride);
    for (int64_t j = valid; j < NR; ++j) std::fill(rows + j * kRowStride, rows + j * kRowStride + kc, 0.0f);
    float* strip = packed + s * kc * NR;
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t j = 0; j < NR; ++j) strip[k * NR + j] = rows[j * kRowStride + k];
  }
}

// x rows [m0, m0 + count) × k [k0, k0 + kc) as tiles of MR rows (the last may be shorter, r rows),
// each tile k-major: packed[t·MR·kc + k·r + i] = x[m0 + t·MR + i, k0 + k].
void pack_inputs(const float* x, int64_t K, int64_t m0, int64_t count, int64_t k0, int64_t kc, float* packed) {
  for (int64_t t = 0; t * MR < count; ++t) {
    const int64_t r = std::min<int64_t>(MR, count - t * MR);
    float* tile = packed + t * MR * kc;
    for (int64_t i = 0; i < r; ++i) {
      const float* src = x + (m0 + t * MR + i) * K + k0;
      for (int64_t k = 0; k < kc; ++k) tile[k * r + i] = src[k];
    }
  }
}

// y[R, cols] (= bias or 0 when first, else +=) a[kc, R]ᵀ · b[kc, NR], with R × NR accumulators in registers.
template <int R>
void micro_kernel(const float* a, const float* b, int64_t kc, float* y, int64_t ldy, int64_t cols, bool first,
                  const float* bias) {
  vfloat c0[R], c1[R];
  for (int i = 0; i < R; ++i) c0[i] = c1[i] = vzero();
  for (int64_t k = 0; k < kc; ++k) {
    const vfloat b0 = vload(b + k * NR), b1 = vload(b + k * NR + kLanes);
    for (int i = 0; i < R; ++i) {
      const vfloat av = vbroadcast(a[k * R + i]);
      c0[i] = vfma(av, b0, c0[i]);
      c1[i] = vfma(av, b1, c1[i]);
    }
  }
  if (cols == NR) {
    const vfloat bias0 = bias ? vload(bias) : vzero(), bias1 = bias ? vload(bias + kLanes) : vzero();
    for (int i = 0; i < R; ++i) {
      float* yr = y + i * ldy;
      vstore(yr, vadd(first ? bias0 : vload(yr), c0[i]));
      vstore(yr + kLanes, vadd(first ? bias1 : vload(yr + kLanes), c1[i]));
    }
  } else {
    for (int i = 0; i < R; ++i) {
      float tile[NR];
      vstore(tile, c0[i]);
      vstore(tile + kLanes, c1[i]);
      float* yr = y + i * ldy;
      for (int64_t j = 0; j < cols; ++j) yr[j] = (first ? (bias ? bias[j] : 0.0f) : yr[j]) + tile[j];
    }
  }
}

using MicroKernel = void (*)(const float*, const float*, int64_t, float*, int64_t, int64_t, bool, const float*);

template <int... R>
constexpr auto make_micro_kernels(std::integer_sequence<int, R...>) {
  return std::array<MicroKernel, sizeof...(R)>{&micro_kernel<R + 1>...};
}
// micro_kernels[r - 1] handles a tile of r rows.
constexpr auto micro_kernels = make_micro_kernels(std::make_integer_sequence<int, MR>{});

// The rectangle y[m_begin:m_end, n_begin:n_end] on the calling thread.
template <DType T>
void gemm_block(const float* x, const uint8_t* w, const float* bias, float* y, int64_t N, int64_t K,
                int64_t m_begin, int64_t m_end, int64_t n_begin, int64_t n_end) {
  const int64_t row_bytes = Format<T>::row_bytes(K);
  const int64_t packed_w_size = NC * KC, packed_x_size = MC * KC, rows_size = NR * kRowStride;
  float* scratch = t_scratch.get(packed_w_size + packed_x_size + rows_size);
  float* packed_w = scratch;
  float* packed_x = scratch + packed_w_size;
  float* rows = packed_x + packed_x_size;

  for (int64_t n0 = n_begin; n0 < n_end; n0 += NC) {
    const int64_t nc = std::min(NC, n_end - n0);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      const bool first = k0 == 0;
      pack_weights<T>(w, row_bytes, n0, nc, k0, kc, packed_w, rows);
      for (int64_t m0 = m_begin; m0 < m_end; m0 += MC) {
        const int64_t mc = std::min(MC, m_end - m0);
        pack_inputs(x, K, m0, mc, k0, kc, packed_x);
        for (int64_t s = 0; s * NR < nc; ++s) {
          const int64_t n = n0 + s * NR;
          const int64_t cols = std::min<int64_t>(NR, nc - s * NR);
          const float* b = packed_w + s * kc * NR;
          for (int64_t t = 0; t * MR < mc; ++t) {
            const int64_t m = m0 + t * MR;
            const int64_t r = std::min<int64_t>(MR, mc - t * MR);
            micro_kernels[r - 1](packed_x + t * MR * kc, b, kc, y + m * N + n, N, cols, first,
                                 bias ? bias + n : nullptr);
          }
        }
      }
    }
  }
}

template <DType T>
void gemm_prefill_typed(const float* x, const uint8_t* w, const float* bias, float* y, int64_t M, int64_t N,
                        int64_t K) {
  const int64_t strips = (N + NR - 1) / NR;
  const int threads = num_threads();
  if (strips >= 4 * threads || M < 2 * MR * threads) {
    const int64_t min_strips = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, M * NR * K));
    parallel_for(strips, min_strips, [&](int64_t begin, int64_t end) {
      gemm_block<T>(x, w, bias, y, N, K, 0, M, begin * NR, std::min(N, end * NR));
    });
  } else {
    // Few output features: split the rows of x instead (each thread packs the small W itself).
    const int64_t tiles = (M + MR - 1) / MR;
    parallel_for(tiles, 1, [&](int64_t begin, int64_t end) {
      gemm_block<T>(x, w, bias, y, N, K, begin * MR, std::min(M, end * MR), 0, N);
    });
  }
}

}  // namespace

void gemm_prefill(const float* x, const uint8_t* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N,
                  int64_t K) {
  switch (w_dtype) {
    case DType::f32: gemm_prefill_typed<DType::f32>(x, w, bias, y, M, N, K); return;
    case DType::f16: gemm_prefill_typed<DType::f16>(x, w, bias, y, M, N, K); return;
    case DType::bf16: gemm_prefill_typed<DType::bf16>(x, w, bias, y, M, N, K); return;
    case DType::q8_0: gemm_prefill_typed<DType::q8_0>(x, w, bias, y, M, N, K); return;
    default: break;
  }
  std::fprintf(stderr, "mamba-ssm: matmul: unsupported weight dtype %s\n", dtype_name(w_dtype));
  std::abort();
}

}  // namespace gemm_detail
}  // namespace mssm::cpu::MSSM_LEVEL
