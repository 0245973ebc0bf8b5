// Token selection on the device (cuda_kernels.h): argmax, and one draw per row after the filters of
// cpu::KernelTable::sample, with its rules (native/cpu/sampling.cpp): the repetition penalty from the
// original logits, temperature 0 as argmax, top_k by the logits (ties: lower index), e = exp(l − m)
// over what is kept with Z = Σ e, top_p as the shortest prefix in descending e (ties: lower index)
// whose Σ e reaches top_p·Z, min_p dropping e < min_p, and the first candidate, in that order, at
// which the running Σ e exceeds u·(Σ e of the kept); the last candidate when rounding leaves it short.
//
// One block per row. Where the CPU sorts (lazily), the device selects: each "first element of the
// descending order at which a running sum reaches (or exceeds) a target" is found by a radix descent
// over the 32 bits of an order-preserving key, 8 bits a pass, with per-digit weight sums in shared
// memory, then a scan in index order among the elements equal to the key found. Sums are in double,
// as the CPU's, but in another order: a draw that falls within rounding (about 1e-16 of Z) of a
// boundary between two tokens may pick the other one.
#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace mssm::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// Keys whose unsigned order is the floats' order: −0 and +0 are one key (they compare equal), −∞ is
// the lowest of the numbers and NaN (which the sanitised logits never hold) below it.
__device__ __forceinline__ uint32_t order_key(float v) {
  if (isnan(v)) return 0;
  const uint32_t b = __float_as_uint(v + 0.0f);  // −0 + 0 = +0
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The largest v over [0, n) with the lowest index among equals; NaN never wins (all NaN / −∞: 0).
__device__ int64_t block_argmax(const float* v, int64_t n) {
  __shared__ float best_v[kWarps];
  __shared__ long long best_i[kWarps];
  float bv = -INFINITY;
  long long bi = -1;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float x = v[i];
    if (x > bv) bv = x, bi = i;  // strided ascending: the first of equals stays; −∞ and NaN never win
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const long long oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) bv = ov, bi = oi;
  }
  if (threadIdx.x % 32 == 0) best_v[threadIdx.x / 32] = bv, best_i[threadIdx.x / 32] = bi;
  __syncthreads();
  __shared__ long long result;
  if (threadIdx.x == 0) {
    float v0 = -INFINITY;
    long long i0 = -1;
    for (int w = 0; w < kWarps; ++w)
      if (best_i[w] >= 0 && (i0 < 0 || best_v[w] > v0 || (best_v[w] == v0 && best_i[w] < i0))) v0 = best_v[w], i0 = best_i[w];
    result = i0 < 0 ? 0 : i0;
  }
  __syncthreads();
  return result;
}

// Block-wide inclusive sum of one double per thread.
__device__ double block_inclusive_sum(double x, double* total) {
  __shared__ double warp_sums[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double incl = x;
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    double s = lane < kWarps ? warp_sums[lane] : 0.0;
    for (int o = 1; o < 32; o <<= 1) {
      const double y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    if (lane < kWarps) warp_sums[lane] = s;
  }
  __syncthreads();
  const double result = incl + (warp > 0 ? warp_sums[warp - 1] : 0.0);
  *total = warp_sums[kWarps - 1];
  __syncthreads();
  return result;
}

// Among the candidates (candidate(i)), in the order key descending then index ascending, the first
// element at which the running weight reaches `target` (exceed: goes beyond it), or the last candidate
// when it never does. *through: the running weight through that element. -1 when there is none.
template <typename Key, typename Weight, typename Candidate>
__device__ int64_t block_select(int64_t n, Key key, Weight weight, Candidate candidate, double target, bool exceed,
                                double* through) {
  __shared__ double sums[256];
  __shared__ int counts[256];
  __shared__ uint32_t prefix, mask;
  __shared__ double above;  // weight of the candidates ordered before the current prefix's
  __shared__ bool last;     // no crossing: follow the lowest non-empty digits (the last candidate)
  __shared__ bool any;
  __syncthreads();  // everyone is past any earlier use of these shared variables
  if (threadIdx.x == 0) prefix = 0, mask = 0, above = 0.0, last = false, any = true;
  __syncthreads();
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += kThreads) sums[d] = 0.0, counts[d] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      if (!candidate(i)) continue;
      const uint32_t k = key(i);
      if ((k & mask) != prefix) continue;
      const int d = (k >> shift) & 255;
      atomicAdd(&sums[d], weight(i));
      atomicAdd(&counts[d], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double acc = 0.0;
      int chosen = -1, lowest = -1;
      for (int d = 255; d >= 0; --d) {
        if (counts[d] == 0) continue;
        lowest = d;
        const double c = above + acc + sums[d];
        if (!last && chosen < 0 && (exceed ? c > target : c >= target)) {
          chosen = d;
          break;
        }
        acc += sums[d];
      }
      if (lowest < 0) {
        any = false;
      } else {
        if (chosen < 0) {
          // No crossing below this prefix: the last candidate, whose digit is the lowest non-empty;
          // the weight above it is everything but that digit's.
          last = true;
          chosen = lowest;
          acc -= sums[lowest];
        }
        above += acc;
        prefix |= (uint32_t)chosen << shift;
        mask |= 0xffu << shift;
      }
    }
    __syncthreads();
    if (!any) return -1;
  }
  // Among the candidates with key == prefix, in index order. `highest`: the last of them, taken when
  // `last` says so, or when the sums in index order, rounded differently from the digit sums, never
  // cross.
  __shared__ long long found, highest;
  __shared__ double found_through;
  if (threadIdx.x == 0) found = -1, highest = -1;
  __syncthreads();
  double base = above;
  for (int64_t i0 = 0; i0 < n; i0 += kThreads) {
    const int64_t i = i0 + threadIdx.x;
    const bool mine = i < n && candidate(i) && key(i) == prefix;
    double chunk_total;
    const double incl = block_inclusive_sum(mine ? weight(i) : 0.0, &chunk_total);
    const double c = base + incl;
    if (mine) {
      atomicMax(&highest, (long long)i);
      if (!last && (exceed ? c > target : c >= target))
        atomicMin(reinterpret_cast<unsigned long long*>(&found), (unsigned long long)i);  // -1 is the largest
    }
    __syncthreads();
    if (found >= 0) break;  // uniform: read after the barrier
    base += chunk_total;
    __syncthreads();
  }
  if (threadIdx.x == 0 && found < 0) found = highest;
  // The running weight through the element found (recomputed: one more pass over its equals).
  if (threadIdx.x == 0) found_through = 0.0;
  __syncthreads();
  if (found < 0) return -1;
  double mine_sum = 0.0;
  for (int64_t i = threadIdx.x; i <= found; i += kThreads)
    if (candidate(i) && key(i) == prefix) mine_sum += weight(i);
  atomicAdd(&found_through, mine_sum);
  __syncthreads();
  *through = above + found_through;
  return found;
}

struct RowParams {
  float temperature, top_p, min_p, penalty;
  int64_t top_k, penalty_count;
  const int32_t* penalty_tokens;  // [rows][penalty_count]
};

__global__ void __launch_bounds__(kThreads)
    argmax_kernel(const float* logits, int64_t vocab, int32_t* out) {
  const int64_t r = blockIdx.x;
  const int64_t best = block_argmax(logits + r * vocab, vocab);
  if (threadIdx.x == 0) out[r] = (int32_t)best;
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* logits_in, int64_t V, RowParams p, const float* u, int32_t* out, float* work) {
  const int64_t r = blockIdx.x;
  const float* logits = logits_in + r * V;
  float* l = work + r * 2 * V;
  float* e = l + V;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) l[i] = isnan(logits[i]) ? -INFINITY : logits[i];
  __syncthreads();
  if (p.penalty != 1.0f && p.penalty_tokens) {
    // From the original logit: a token listed twice is written twice with the same value.
    const int32_t* list = p.penalty_tokens + r * p.penalty_count;
    for (int64_t j = threadIdx.x; j < p.penalty_count; j += kThreads) {
      const int32_t t = list[j];
      if (t < 0 || t >= V || isnan(logits[t])) continue;
      l[t] = logits[t] > 0.0f ? logits[t] / p.penalty : logits[t] * p.penalty;
    }
    __syncthreads();
  }
  if (!(p.temperature > 0.0f)) {
    const int64_t best = block_argmax(l, V);
    if (threadIdx.x == 0) out[r] = (int32_t)best;
    return;
  }
  for (int64_t i = threadIdx.x; i < V; i += kThreads) l[i] /= p.temperature;
  __syncthreads();
  const int64_t best = block_argmax(l, V);
  const float m = l[best];
  if (!isfinite(m)) {
    if (threadIdx.x == 0) out[r] = (int32_t)best;
    return;
  }
  // top_k: the k best logits (ties: lower index), bounded by the k-th (key, index).
  const bool use_top_k = p.top_k > 0 && p.top_k < V;
  uint32_t k_key = 0;
  int64_t k_index = V;
  if (use_top_k) {
    double ignored;
    const int64_t kth = block_select(
        V, [&](int64_t i) { return order_key(l[i]); }, [](int64_t) { return 1.0; }, [](int64_t) { return true; },
        (double)p.top_k, false, &ignored);
    k_key = order_key(l[kth]);
    k_index = kth;
  }
  auto in_top_k = [&](int64_t i) {
    if (!use_top_k) return true;
    const uint32_t k = order_key(l[i]);
    return k > k_key || (k == k_key && i <= k_index);
  };
  const float min_p = p.min_p > 0.0f ? fminf(p.min_p, 1.0f) : 0.0f;
  double t_part = 0.0, k_part = 0.0;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float x = in_top_k(i) ? expf(l[i] - m) : -1.0f;  // -1: not a candidate
    e[i] = x;
    if (x >= 0.0f) {
      t_part += x;
      if (x >= min_p) k_part += x;
    }
  }
  __syncthreads();
  double total, kept_total;
  block_inclusive_sum(t_part, &total);
  block_inclusive_sum(k_part, &kept_total);
  auto candidate = [&](int64_t i) { return e[i] >= min_p && e[i] >= 0.0f; };
  auto e_key = [&](int64_t i) { return __float_as_uint(e[i]); };  // e ≥ 0: its bits order as its value
  auto e_weight = [&](int64_t i) { return (double)e[i]; };
  uint32_t p_key = 0;
  int64_t p_index = V;
  bool use_top_p = p.top_p < 1.0f;
  if (use_top_p) {
    double through = 0.0;
    const int64_t last = block_select(V, e_key, e_weight, candidate, (double)p.top_p * total, false, &through);
    if (last >= 0) {
      p_key = e_key(last);
      p_index = last;
      kept_total = through;
    } else {
      use_top_p = false;
    }
  }
  auto kept = [&](int64_t i) {
    if (!candidate(i)) return false;
    if (!use_top_p) return true;
    const uint32_t k = e_key(i);
    return k > p_key || (k == p_key && i <= p_index);
  };
  double ignored;
  const int64_t chosen = block_select(V, e_key, e_weight, kept, (double)u[r] * kept_total, true, &ignored);
  if (threadIdx.x == 0) out[r] = (int32_t)(chosen < 0 ? best : chosen);
}

}  // namespace

Status argmax(const float* logits, int64_t rows, int64_t vocab, int32_t* out, cudaStream_t stream) {
  if (rows <= 0) return {};
  if (rows > 0x7fffffff) return detail::error("argmax", "too many rows");
  if (vocab <= 0) {
    MSSM_CUDA_TRY("argmax", cudaMemsetAsync(out, 0, rows * sizeof(int32_t), stream));
    return {};
  }
  argmax_kernel<<<(unsigned)rows, kThreads, 0, stream>>>(logits, vocab, out);
  return detail::check_launch("argmax");
}

size_t sample_workspace_bytes(int64_t rows, int64_t vocab) { return (size_t)(rows * 2 * vocab) * sizeof(float); }

Status sample(const float* logits, int64_t rows, int64_t vocab, const cpu::SamplingParams& params, const float* u,
              int32_t* out, void* workspace, cudaStream_t stream) {
  const char* op = "sample";
  if (rows <= 0) return {};
  if (vocab <= 0) {
    MSSM_CUDA_TRY(op, cudaMemsetAsync(out, 0, rows * sizeof(int32_t), stream));
    return {};
  }
  if (!workspace) return detail::error(op, "a workspace of sample_workspace_bytes() is required");
  if (!u) return detail::error(op, "u (one uniform draw per row) is required");
  if (rows > 0x7fffffff) return detail::error(op, "too many rows");
  const RowParams p{params.temperature, params.top_p, params.min_p, params.repetition_penalty, params.top_k,
                    params.penalty_count, params.penalty_tokens};
  sample_kernel<<<(unsigned)rows, kThreads, 0, stream>>>(logits, vocab, p, u, out, static_cast<float*>(workspace));
  return detail::check_launch(op);
}

}  // namespace mssm::cuda
