// Matrix products with weights stored as f32, f16, bf16 or q8_0, and conversions between dtypes.
//
// Glossary (shapes as in kernels.h):
//   M, N, K   y[M,N] = x[M,K] · W[N,K]ᵀ (+ bias[N]): rows of x, output features, input features
//   lanes     floats in one SIMD register at this level (16 AVX-512, 8 AVX2, 4 SSE2 or plain C++)
//   unit      elements decoded from a weight row in one step: one register, or one q8_0 block (32)
//   MR × NR   the register tile of the prefill micro-kernel: MR rows of x by NR output features
//   KC        depth (in K) of one packed panel;  MC, NC  rows of x / output features per cache block
//
// Two paths, chosen by M. Decode (few rows of x, this file) is bound by reading W: each weight row is
// streamed once, widened to f32 in registers and dotted with every row of x. Prefill (many rows,
// gemm_prefill.cpp) is bound by arithmetic and works on packed panels of W and x.
#include "gemm_common.h"

namespace mssm::cpu::MSSM_LEVEL {
namespace {
using namespace gemm_detail;

// ---- Decode: few rows of x, each weight row read once ------------------------------------------
// sums[m] = x[m, 0:count] · row[0:count] for the MT rows of x (x_stride apart). The step of the main
// loop holds several registers of weights so that independent accumulators hide the FMA latency.
template <DType T, int MT>
void dot_row(const float* x, int64_t x_stride, int64_t count, const uint8_t* row, float* sums) {
  using F = Format<T>;
  constexpr int vectors_per_unit = (int)(F::unit / kLanes);
  constexpr int wanted = MT == 1 ? 4 : 2;
  constexpr int units_per_step = wanted / vectors_per_unit > 1 ? wanted / vectors_per_unit : 1;
  constexpr int vectors = units_per_step * vectors_per_unit;
  constexpr int budget = kRegisters / 2 / MT > 1 ? kRegisters / 2 / MT : 1;
  constexpr int accumulators = vectors < budget ? vectors : budget;
  constexpr int64_t step = units_per_step * F::unit;

  vfloat acc[MT][accumulators];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < accumulators; ++a) acc[m][a] = vzero();

  int64_t k = 0;
  for (; k + step <= count; k += step) {
    vfloat w[vectors];
    for (int u = 0; u < units_per_step; ++u) F::load(row, k + u * F::unit, w + u * vectors_per_unit);
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < vectors; ++v)
        acc[m][v % accumulators] = vfma(w[v], vload(x + m * x_stride + k + v * kLanes), acc[m][v % accumulators]);
  }
  for (; k + F::unit <= count; k += F::unit) {
    vfloat w[vectors_per_unit];
    F::load(row, k, w);
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < vectors_per_unit; ++v)
        acc[m][v % accumulators] = vfma(w[v], vload(x + m * x_stride + k + v * kLanes), acc[m][v % accumulators]);
  }
  for (int m = 0; m < MT; ++m) {
    vfloat total = acc[m][0];
    for (int a = 1; a < accumulators; ++a) total = vadd(total, acc[m][a]);
    sums[m] = vsum(total);
  }
  for (; k < count; ++k) {
    float w = F::element(row, k);
    for (int m = 0; m < MT; ++m) sums[m] += w * x[m * x_stride + k];
  }
}

constexpr int kDecodeTile = 4;  // rows of x per dot_row call

template <DType T>
void matvec_rows(const float* x, const uint8_t* w, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                 int64_t n_begin, int64_t n_end) {
  const int64_t row_bytes = Format<T>::row_bytes(K);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = w + n * row_bytes;
    const float b = bias ? bias[n] : 0.0f;
    // The weight row is fetched from memory by the first tile; later tiles find it in cache.
    for (int64_t m0 = 0; m0 < M; m0 += kDecodeTile) {
      float sums[kDecodeTile];
      const float* xt = x + m0 * K;
      switch (std::min<int64_t>(kDecodeTile, M - m0)) {
        case 1: dot_row<T, 1>(xt, K, K, row, sums); break;
        case 2: dot_row<T, 2>(xt, K, K, row, sums); break;
        case 3: dot_row<T, 3>(xt, K, K, row, sums); break;
        default: dot_row<T, 4>(xt, K, K, row, sums); break;
      }
      for (int64_t m = m0; m < std::min<int64_t>(M, m0 + kDecodeTile); ++m) y[m * N + n] = sums[m - m0] + b;
    }
  }
}

// Up to this many rows of x, streaming W once (decode) beats packing it.
constexpr int64_t kDecodeMaxRows = 8;

template <DType T>
void matmul_typed(const float* x, const void* w_any, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  const uint8_t* w = static_cast<const uint8_t*>(w_any);
  if (M <= kDecodeMaxRows) {
    const int64_t min_rows = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, M * K));
    parallel_for(N, min_rows, [&](int64_t begin, int64_t end) { matvec_rows<T>(x, w, bias, y, M, N, K, begin, end); });
    return;
  }
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

void matmul(const float* x, const void* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] = bias ? bias[n] : 0.0f;
    return;
  }
  switch (w_dtype) {
    case DType::f32: matmul_typed<DType::f32>(x, w, bias, y, M, N, K); return;
    case DType::f16: matmul_typed<DType::f16>(x, w, bias, y, M, N, K); return;
    case DType::bf16: matmul_typed<DType::bf16>(x, w, bias, y, M, N, K); return;
    case DType::q8_0:
      if (K % kQ8BlockSize != 0) {
        std::fprintf(stderr, "mamba-ssm: matmul: q8_0 weights need K %% 32 == 0 (K = %lld)\n", (long long)K);
        std::abort();
      }
      matmul_typed<DType::q8_0>(x, w, bias, y, M, N, K);
      return;
    default: break;
  }
  std::fprintf(stderr, "mamba-ssm: matmul: unsupported weight dtype %s\n", dtype_name(w_dtype));
  std::abort();
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
