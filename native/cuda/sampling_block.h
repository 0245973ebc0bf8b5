// The argmax and the sampler of sampling.cu, one block per row, as block bodies on native/cuda/block.h's
// primitives, so that they also compile without nvcc: a CPU test runs them on emulated blocks of
// kThreads lanes against the CPU sampler (native/tests/test_sampling_blocks.cpp).
//
// The rules are cpu::KernelTable::sample's (native/cpu/sampling.cpp): the repetition penalty from the
// original logits, temperature 0 as argmax, top_k by the logits (ties: lower index), e = exp(l − m)
// over what is kept with Z = Σ e, top_p as the shortest prefix in descending e (ties: lower index)
// whose Σ e reaches top_p·Z, min_p dropping e < min_p, and the first candidate, in that order, at
// which the running Σ e exceeds u·(Σ e of the kept); the last candidate when rounding leaves it short.
//
// Where the CPU sorts (lazily), the device selects: each "first element of the descending order at
// which a running sum reaches (or exceeds) a target" is found by a radix descent over the 32 bits of
// an order-preserving key, 8 bits a pass, with per-digit weight sums in shared memory, then a scan in
// index order among the elements equal to the key found. Sums are in double, as the CPU's, but in
// another order: a draw that falls within rounding (about 1e-16 of Z) of a boundary between two
// tokens may pick the other one.
#pragma once
#include <cmath>
#include <cstdint>

#include "block.h"

namespace mssm::cuda::sampling {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// Keys whose unsigned order is the floats' order: −0 and +0 are one key (they compare equal), −∞ is
// the lowest of the numbers and NaN (which the sanitised logits never hold) below it.
MSSM_BLOCK_FN uint32_t order_key(float v) {
  if (block::is_nan(v)) return 0;
  const uint32_t b = block::float_bits(v + 0.0f);  // −0 + 0 = +0
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The largest v over [0, n) with the lowest index among equals; NaN never wins (all NaN / −∞: 0).
MSSM_BLOCK_FN int64_t block_argmax(const float* v, int64_t n) {
  MSSM_SHARED(float[kWarps], best_v);
  MSSM_SHARED(long long[kWarps], best_i);
  float bv = -INFINITY;
  long long bi = -1;
  for (int64_t i = MSSM_RANK; i < n; i += kThreads) {
    const float x = v[i];
    if (x > bv) bv = x, bi = i;  // strided ascending: the first of equals stays; −∞ and NaN never win
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = block::shuffle_xor(bv, o);
    const long long oi = block::shuffle_xor(bi, o);
    if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) bv = ov, bi = oi;
  }
  if (block::lane_id() == 0) best_v[block::warp_id()] = bv, best_i[block::warp_id()] = bi;
  MSSM_SYNC();
  MSSM_SHARED(long long, result);
  if (MSSM_RANK == 0) {
    float v0 = -INFINITY;
    long long i0 = -1;
    for (int w = 0; w < kWarps; ++w)
      if (best_i[w] >= 0 && (i0 < 0 || best_v[w] > v0 || (best_v[w] == v0 && best_i[w] < i0))) v0 = best_v[w], i0 = best_i[w];
    result = i0 < 0 ? 0 : i0;
  }
  MSSM_SYNC();
  return result;
}

// Among the candidates (candidate(i)), in the order key descending then index ascending, the first
// element at which the running weight reaches `target` (exceed: goes beyond it), or the last candidate
// when it never does. *through: the running weight through that element. -1 when there is none.
template <typename Key, typename Weight, typename Candidate>
MSSM_BLOCK_FN int64_t block_select(int64_t n, Key key, Weight weight, Candidate candidate, double target, bool exceed,
                                double* through) {
  MSSM_SHARED(double[256], sums);
  MSSM_SHARED(int[256], counts);
  MSSM_SHARED(uint32_t, prefix);
  MSSM_SHARED(uint32_t, mask);
  MSSM_SHARED(double, above);  // weight of the candidates ordered before the current prefix's
  MSSM_SHARED(bool, last);     // no crossing: follow the lowest non-empty digits (the last candidate)
  MSSM_SHARED(bool, any);
  MSSM_SYNC();  // everyone is past any earlier use of these shared variables
  if (MSSM_RANK == 0) prefix = 0, mask = 0, above = 0.0, last = false, any = true;
  MSSM_SYNC();
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = MSSM_RANK; d < 256; d += kThreads) sums[d] = 0.0, counts[d] = 0;
    MSSM_SYNC();
    for (int64_t i = MSSM_RANK; i < n; i += kThreads) {
      if (!candidate(i)) continue;
      const uint32_t k = key(i);
      if ((k & mask) != prefix) continue;
      const int d = (k >> shift) & 255;
      MSSM_ATOMIC_ADD(&sums[d], weight(i));
      MSSM_ATOMIC_ADD(&counts[d], 1);
    }
    MSSM_SYNC();
    if (MSSM_RANK == 0) {
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
    MSSM_SYNC();
    if (!any) return -1;
  }
  // Among the candidates with key == prefix, in index order. `highest`: the last of them, taken when
  // `last` says so, or when the sums in index order, rounded differently from the digit sums, never
  // cross.
  MSSM_SHARED(long long, found);
  MSSM_SHARED(long long, highest);
  MSSM_SHARED(double, found_through);
  if (MSSM_RANK == 0) found = -1, highest = -1;
  MSSM_SYNC();
  double base = above;
  for (int64_t i0 = 0; i0 < n; i0 += kThreads) {
    const int64_t i = i0 + MSSM_RANK;
    const bool mine = i < n && candidate(i) && key(i) == prefix;
    double chunk_total;
    const double incl = block::inclusive_sum<double, kThreads>(mine ? weight(i) : 0.0, &chunk_total);
    const double c = base + incl;
    if (mine) {
      block::atomic_max(&highest, (long long)i);
      if (!last && (exceed ? c > target : c >= target))
        block::atomic_min(reinterpret_cast<unsigned long long*>(&found), (unsigned long long)i);  // -1 is the largest
    }
    MSSM_SYNC();
    if (found >= 0) break;  // uniform: read after the barrier
    base += chunk_total;
    MSSM_SYNC();
  }
  if (MSSM_RANK == 0 && found < 0) found = highest;
  // The running weight through the element found (recomputed: one more pass over its equals).
  if (MSSM_RANK == 0) found_through = 0.0;
  MSSM_SYNC();
  if (found < 0) return -1;
  double mine_sum = 0.0;
  for (int64_t i = MSSM_RANK; i <= found; i += kThreads)
    if (candidate(i) && key(i) == prefix) mine_sum += weight(i);
  MSSM_ATOMIC_ADD(&found_through, mine_sum);
  MSSM_SYNC();
  *through = above + found_through;
  return found;
}

struct RowParams {
  float temperature, top_p, min_p, penalty;
  int64_t top_k, penalty_count;
  const int32_t* penalty_tokens;  // [rows][penalty_count]
};

// Block r of the argmax kernel: out[r] = the argmax of row r.
MSSM_BLOCK_FN void argmax_row(const float* logits, int64_t vocab, int32_t* out, int64_t r) {
  const int64_t best = block_argmax(logits + r * vocab, vocab);
  if (MSSM_RANK == 0) out[r] = (int32_t)best;
}

// Block r of the sampling kernel: out[r] = the token drawn from row r with u[r] (work: 2·V floats a row).
MSSM_BLOCK_FN void sample_row(const float* logits_in, int64_t V, const RowParams& p, const float* u, int32_t* out,
                              float* work, int64_t r) {
  const float* logits = logits_in + r * V;
  float* l = work + r * 2 * V;
  float* e = l + V;
  for (int64_t i = MSSM_RANK; i < V; i += kThreads) l[i] = block::is_nan(logits[i]) ? -INFINITY : logits[i];
  MSSM_SYNC();
  if (p.penalty != 1.0f && p.penalty_tokens) {
    // From the original logit: a token listed twice is written twice with the same value.
    const int32_t* list = p.penalty_tokens + r * p.penalty_count;
    for (int64_t j = MSSM_RANK; j < p.penalty_count; j += kThreads) {
      const int32_t t = list[j];
      if (t < 0 || t >= V || block::is_nan(logits[t])) continue;
      l[t] = logits[t] > 0.0f ? logits[t] / p.penalty : logits[t] * p.penalty;
    }
    MSSM_SYNC();
  }
  if (!(p.temperature > 0.0f)) {
    const int64_t best = block_argmax(l, V);
    if (MSSM_RANK == 0) out[r] = (int32_t)best;
    return;
  }
  for (int64_t i = MSSM_RANK; i < V; i += kThreads) l[i] /= p.temperature;
  MSSM_SYNC();
  const int64_t best = block_argmax(l, V);
  const float m = l[best];
  if (!block::is_finite(m)) {
    if (MSSM_RANK == 0) out[r] = (int32_t)best;
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
  for (int64_t i = MSSM_RANK; i < V; i += kThreads) {
    const float x = in_top_k(i) ? expf(l[i] - m) : -1.0f;  // -1: not a candidate
    e[i] = x;
    if (x >= 0.0f) {
      t_part += x;
      if (x >= min_p) k_part += x;
    }
  }
  MSSM_SYNC();
  double total, kept_total;
  block::inclusive_sum<double, kThreads>(t_part, &total);
  block::inclusive_sum<double, kThreads>(k_part, &kept_total);
  auto candidate = [&](int64_t i) { return e[i] >= min_p && e[i] >= 0.0f; };
  auto e_key = [&](int64_t i) { return block::float_bits(e[i]); };  // e ≥ 0: its bits order as its value
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
  if (MSSM_RANK == 0) out[r] = (int32_t)(chosen < 0 ? best : chosen);
}

}  // namespace mssm::cuda::sampling
