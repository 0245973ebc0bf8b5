// The thread-block primitives of the kernels whose code also compiles without nvcc (ssd_tiles.h,
// ssd_backward_block.h, sampling_block.h, moe_block.h, gemm_block.h, scan_train_block.h, with
// scalar.h's functions): the thread's rank in its block, the barriers, warp shuffles and sums, a
// block-wide scan, atomics on shared or global memory, and block-shared variables.
//
// Under nvcc they are the CUDA ones. Without nvcc a block runs on the host as emulated lanes
// (native/tests/emulated_block.h: coroutines on one thread, one at a time, switched at every barrier in
// orders chosen to expose a missing one); host::Lane tells the running lane its rank and how to wait.
// A thread that has not been given a place runs as the only lane of a block (rank 0, no barriers),
// which code written for any block size (ssd_tiles.h's) allows and warp shuffles do not: a shuffle
// there aborts.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace mssm::cuda::block {
// T itself: lets MSSM_SHARED(double[256], sums) declare an array.
template <typename T>
using Type = T;
}  // namespace mssm::cuda::block

#ifdef __CUDACC__
#include <cuda_runtime.h>
#define MSSM_BLOCK_FN __device__ __forceinline__
#define MSSM_DEVICE_FN __device__
#define MSSM_HD __host__ __device__
#define MSSM_RANK ((int)threadIdx.x)
#define MSSM_SYNC() __syncthreads()
#define MSSM_SHARED(T, name) __shared__ ::mssm::cuda::block::Type<T> name
#define MSSM_ATOMIC_ADD(p, v) atomicAdd((p), (v))
#else
namespace mssm::cuda::block::host {
// The calling thread's place in an emulated block, set by the emulator for each of its threads.
struct Lane {
  int rank = 0, stride = 1;             // rank in the block, and the block's thread count
  void (*sync)(void*) = nullptr;        // the block's barrier
  void (*warp_sync)(void*) = nullptr;   // the barrier of the lane's warp (lanes rank / 32 · 32 …)
  void* context = nullptr;
  unsigned char* exchange = nullptr;    // 16 bytes a lane, for shuffles
};
inline Lane& lane() {
  static thread_local Lane l;
  return l;
}
inline void sync() {
  Lane& l = lane();
  if (l.sync) l.sync(l.context);
}
// The block-shared variables the bodies have declared so far (MSSM_SHARED: static storage here): filled
// with NaN bytes when first declared (no lane can have written one before passing its declaration),
// and by the emulator before each block it runs.
struct SharedRegion {
  void* at;
  size_t bytes;
};
inline std::vector<SharedRegion>& shared_regions() {
  static std::vector<SharedRegion> regions;
  return regions;
}
inline void declare_shared(void* at, size_t bytes) {
  for (const SharedRegion& r : shared_regions())
    if (r.at == at) return;
  shared_regions().push_back({at, bytes});
  std::memset(at, 0xff, bytes);
}
// The value lane `from` (of the caller's warp) holds, all lanes of the warp taking part.
template <typename T>
T shuffle(T v, int from) {
  static_assert(sizeof(T) <= 16, "shuffled values are at most 16 bytes");
  Lane& l = lane();
  if (!l.exchange || !l.warp_sync) {
    std::fprintf(stderr, "mamba-ssm: a warp shuffle outside an emulated block (native/tests/emulated_block.h)\n");
    std::abort();
  }
  std::memcpy(l.exchange + 16 * l.rank, &v, sizeof(T));
  l.warp_sync(l.context);
  T out;
  std::memcpy(&out, l.exchange + 16 * (l.rank / 32 * 32 + from), sizeof(T));
  l.warp_sync(l.context);  // no lane overwrites its slot before every lane has read
  return out;
}
}  // namespace mssm::cuda::block::host
#define MSSM_BLOCK_FN inline
#define MSSM_DEVICE_FN inline
#define MSSM_HD
#define MSSM_RANK (::mssm::cuda::block::host::lane().rank)
#define MSSM_SYNC() ::mssm::cuda::block::host::sync()
#define MSSM_SHARED(T, name)                      \
  static ::mssm::cuda::block::Type<T> name;        \
  ::mssm::cuda::block::host::declare_shared(&name, sizeof(name))
#define MSSM_ATOMIC_ADD(p, v) (void)(*(p) += (v))
#endif

namespace mssm::cuda::block {

#ifndef __CUDACC__
// A bf16 on the host: its bits, rounded to nearest even as __float2bfloat16_rn rounds (NaN kept NaN).
struct HostBf16 {
  uint16_t bits;
};
inline float to_float(HostBf16 v) {
  const uint32_t u = (uint32_t)v.bits << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline HostBf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return HostBf16{(uint16_t)((u >> 16) | 0x40u)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return HostBf16{(uint16_t)(u >> 16)};
}
#endif

// The thread's lane in its warp and its warp in the block, computed unsigned as CUDA's own index
// arithmetic is (a signed lane costs registers where it bounds loops).
MSSM_BLOCK_FN int lane_id() { return (int)((unsigned)MSSM_RANK % 32u); }
MSSM_BLOCK_FN int warp_id() { return (int)((unsigned)MSSM_RANK / 32u); }

// The warp's barrier.
MSSM_BLOCK_FN void sync_warp() {
#ifdef __CUDACC__
  __syncwarp();
#else
  host::Lane& l = host::lane();
  if (l.warp_sync) l.warp_sync(l.context);
#endif
}

// v of lane (lane ^ mask) of the warp.
template <typename T>
MSSM_BLOCK_FN T shuffle_xor(T v, int mask) {
#ifdef __CUDACC__
  return __shfl_xor_sync(0xffffffffu, v, mask);
#else
  return host::shuffle(v, (MSSM_RANK % 32) ^ mask);
#endif
}

// v of lane (lane − delta) of the warp; lanes below delta keep their own.
template <typename T>
MSSM_BLOCK_FN T shuffle_up(T v, int delta) {
#ifdef __CUDACC__
  return __shfl_up_sync(0xffffffffu, v, delta);
#else
  const int lane = MSSM_RANK % 32;
  return host::shuffle(v, lane >= delta ? lane - delta : lane);
#endif
}

// The sum of v over the warp, in every lane (a butterfly of xor shuffles).
template <typename T>
MSSM_BLOCK_FN T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += shuffle_xor(v, o);
  return v;
}

// Block-wide inclusive sum of one value per thread, for a block of kThreads (≤ 1024) threads: each
// warp scans with shuffles, warp 0 scans the warps' totals, and each thread adds its warp's prefix.
// *total: the block's sum. Every thread must call it; it ends with a barrier, so it may be called
// again at once.
template <typename T, int kThreads>
MSSM_BLOCK_FN T inclusive_sum(T x, T* total) {
  constexpr int kWarps = kThreads / 32;
  MSSM_SHARED(T[kWarps], warp_sums);
  const int lane = lane_id(), warp = warp_id();
  T incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = shuffle_up(incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_sums[warp] = incl;
  MSSM_SYNC();
  if (warp == 0) {
    T s = lane < kWarps ? warp_sums[lane] : T(0);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T y = shuffle_up(s, o);
      if (lane >= o) s += y;
    }
    if (lane < kWarps) warp_sums[lane] = s;
  }
  MSSM_SYNC();
  const T result = incl + (warp > 0 ? warp_sums[warp - 1] : T(0));
  *total = warp_sums[kWarps - 1];
  MSSM_SYNC();
  return result;
}

MSSM_BLOCK_FN void atomic_max(long long* p, long long v) {
#ifdef __CUDACC__
  atomicMax(p, v);
#else
  if (v > *p) *p = v;
#endif
}
MSSM_BLOCK_FN void atomic_min(unsigned long long* p, unsigned long long v) {
#ifdef __CUDACC__
  atomicMin(p, v);
#else
  if (v < *p) *p = v;
#endif
}

MSSM_BLOCK_FN bool is_nan(float v) {
#ifdef __CUDACC__
  return isnan(v);
#else
  return std::isnan(v);
#endif
}
MSSM_BLOCK_FN bool is_finite(float v) {
#ifdef __CUDACC__
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// The bits of a float.
MSSM_BLOCK_FN uint32_t float_bits(float v) {
#ifdef __CUDACC__
  return __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
#endif
}

}  // namespace mssm::cuda::block
