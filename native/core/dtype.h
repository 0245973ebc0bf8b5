// Element types and their scalar conversions.
//
// Layouts are the ones the checkpoint formats use: f16 is IEEE half, bf16 is the upper 16 bits of an
// IEEE float, q8_0 is GGUF's block of 32 values with one fp16 scale (x = q * d).
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

namespace mssm {

enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2, i32 = 3, q8_0 = 4 };

constexpr int64_t kQ8BlockSize = 32;

struct BlockQ8_0 {
  uint16_t d;          // fp16 scale
  int8_t qs[kQ8BlockSize];
};
static_assert(sizeof(BlockQ8_0) == 34, "q8_0 block must be 34 bytes");

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::i32: return "i32";
    case DType::q8_0: return "q8_0";
  }
  return "unknown";
}

// Bytes used by n elements of type t (for q8_0, n must be a multiple of 32).
inline int64_t dtype_bytes(DType t, int64_t n) {
  switch (t) {
    case DType::f32: case DType::i32: return n * 4;
    case DType::f16: case DType::bf16: return n * 2;
    case DType::q8_0: return (n / kQ8BlockSize) * (int64_t)sizeof(BlockQ8_0);
  }
  return -1;
}

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

// Round to nearest even; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { mant <<= 1; ++e; } while ((mant & 0x400u) == 0);
      mant &= 0x3ffu;
      u = sign | (uint32_t)(127 - 15 - e) << 23 | (mant << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  return bits_f32(u);
}

// Round to nearest even, overflow to infinity, underflow through subnormals.
inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return sign | 0x7e00u;            // NaN
  if (au >= 0x477ff000u) return sign | 0x7c00u;           // overflow (>= 65520 rounds to inf)
  if (au < 0x38800000u) {                                 // below the smallest normal half
    if (au < 0x33000000u) return sign;                    // rounds to zero
    uint32_t exp = au >> 23;
    uint32_t mant = (au & 0x7fffffu) | 0x800000u;
    uint32_t s = 126 - exp;                               // value / 2^-24 = mant >> s
    uint32_t q = mant >> s;
    uint32_t rem = mant & ((1u << s) - 1u);
    uint32_t mid = 1u << (s - 1);
    if (rem > mid || (rem == mid && (q & 1u))) ++q;
    return sign | (uint16_t)q;
  }
  uint32_t r = au + 0xfffu + ((au >> 13) & 1u);           // round mantissa to 10 bits
  return sign | (uint16_t)(((r >> 13) - ((127 - 15) << 10)) & 0xffffu);
}

}  // namespace mssm
