// Token selection from logits: argmax, and one seeded draw after the usual filters.
//
// Glossary:
//   V  vocab (logits per row)        l  working logits (penalised, then divided by the temperature)
//   m  max of l over the candidates  e  exp(l − m), the unnormalised fp32 probability (max is 1)
//   Z  Σ e over the softmax set (after top_k)   u  the uniform draw in [0, 1)
//
// sample(), in the order kernels.h gives:
//   1. repetition penalty, HF rule, on each distinct listed token once: l > 0 ? l / r : l · r
//   2. temperature <= 0: argmax of the penalised logits. Otherwise l /= temperature.
//   3. top_k > 0: keep the k largest l (ties: lower index first).
//   4. e = exp(l − m) in fp32 over what is kept, Z = Σ e (sums of e in double).
//   5. top_p < 1: walking in descending e (ties: lower index), keep the shortest prefix whose Σ e
//      reaches top_p · Z (at least one token).
//   6. min_p > 0: drop tokens with e / Z < min_p · (1 / Z), i.e. e < min_p.
//   7. with the caller's draw u (kernels.h's sampling_draw: (splitmix64() >> 40) · 2⁻²⁴), return the
//      first kept token, in the same descending order, at which the running Σ e exceeds
//      u · (Σ e over the kept tokens).
// NaN logits count as −∞. Non-finite maxima (+∞, or all −∞) fall back to the argmax.
//
// The descending order is produced lazily (see DescendingOrder): a 50k vocabulary is never fully
// sorted unless the distribution is nearly flat; only the prefix a walk reaches is.
#include "level.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "../core/threadpool.h"
#include "simd.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mssm::cpu::MSSM_LEVEL {
namespace {

constexpr float kNegativeInfinity = -std::numeric_limits<float>::infinity();

// Index of the largest of v[0, n) (ties: lowest index; NaN never wins; all −∞/NaN gives 0).
int64_t argmax_row(const float* v, int64_t n) {
  float best = kNegativeInfinity;
  int64_t best_index = 0;
  int64_t i = 0;
#if defined(__AVX512F__)
  if (n >= 16) {
    // Per lane: the first occurrence of that lane's maximum (strict > keeps the earlier index).
    __m512 lane_best = _mm512_set1_ps(kNegativeInfinity);
    __m512i lane_index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i current = lane_index;
    const __m512i step = _mm512_set1_epi32(16);
    for (; i + 16 <= n; i += 16) {
      const __m512 x = _mm512_loadu_ps(v + i);
      const __mmask16 greater = _mm512_cmp_ps_mask(x, lane_best, _CMP_GT_OQ);
      lane_best = _mm512_mask_mov_ps(lane_best, greater, x);
      lane_index = _mm512_mask_mov_epi32(lane_index, greater, current);
      current = _mm512_add_epi32(current, step);
    }
    alignas(64) float values[16];
    alignas(64) int32_t indices[16];
    _mm512_store_ps(values, lane_best);
    _mm512_store_si512((void*)indices, lane_index);
    best_index = std::numeric_limits<int32_t>::max();
    for (int lane = 0; lane < 16; ++lane)
      if (values[lane] > best || (values[lane] == best && indices[lane] < best_index)) {
        best = values[lane];
        best_index = indices[lane];
      }
  }
#elif defined(__AVX2__)
  if (n >= 8) {
    __m256 lane_best = _mm256_set1_ps(kNegativeInfinity);
    __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i current = lane_index;
    const __m256i step = _mm256_set1_epi32(8);
    for (; i + 8 <= n; i += 8) {
      const __m256 x = _mm256_loadu_ps(v + i);
      const __m256 greater = _mm256_cmp_ps(x, lane_best, _CMP_GT_OQ);
      lane_best = _mm256_blendv_ps(lane_best, x, greater);
      lane_index = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(lane_index), _mm256_castsi256_ps(current), greater));
      current = _mm256_add_epi32(current, step);
    }
    alignas(32) float values[8];
    alignas(32) int32_t indices[8];
    _mm256_store_ps(values, lane_best);
    _mm256_store_si256((__m256i*)indices, lane_index);
    best_index = std::numeric_limits<int32_t>::max();
    for (int lane = 0; lane < 8; ++lane)
      if (values[lane] > best || (values[lane] == best && indices[lane] < best_index)) {
        best = values[lane];
        best_index = indices[lane];
      }
  }
#endif
  for (; i < n; ++i)
    if (v[i] > best) {
      best = v[i];
      best_index = i;
    }
  return best_index;
}


// l[i] ← exp(l[i] − m) over [0, n). Returns Σ e; *kept_sum receives Σ of the e ≥ floor. The sums
// are in double: over 50k terms an fp32 sum drifts by more than the smallest probabilities.
double exp_in_place(float* l, int64_t n, float m, float floor, double* kept_sum) {
  int64_t i = 0;
  double total = 0.0, kept = 0.0;
#if defined(__AVX512F__)
  __m512d total_vector = _mm512_setzero_pd(), kept_vector = _mm512_setzero_pd();
  const __m512 shift = _mm512_set1_ps(m), floor_vector = _mm512_set1_ps(floor);
  for (; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
    const __m512 e = _mm512_maskz_mov_ps(live, simd::vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, l + i), shift)));
    _mm512_mask_storeu_ps(l + i, live, e);
    const __m512 e_kept = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, floor_vector, _CMP_GE_OQ), e);
    total_vector = _mm512_add_pd(total_vector, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    total_vector = _mm512_add_pd(total_vector, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
    kept_vector = _mm512_add_pd(kept_vector, _mm512_cvtps_pd(_mm512_castps512_ps256(e_kept)));
    kept_vector = _mm512_add_pd(kept_vector, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e_kept, 1)));
  }
  total = _mm512_reduce_add_pd(total_vector);
  kept = _mm512_reduce_add_pd(kept_vector);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256d total_vector = _mm256_setzero_pd(), kept_vector = _mm256_setzero_pd();
  const __m256 shift = _mm256_set1_ps(m), floor_vector = _mm256_set1_ps(floor);
  for (; i + 8 <= n; i += 8) {
    const __m256 e = simd::vexp(_mm256_sub_ps(_mm256_loadu_ps(l + i), shift));
    _mm256_storeu_ps(l + i, e);
    const __m256 e_kept = _mm256_and_ps(e, _mm256_cmp_ps(e, floor_vector, _CMP_GE_OQ));
    total_vector = _mm256_add_pd(total_vector, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    total_vector = _mm256_add_pd(total_vector, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    kept_vector = _mm256_add_pd(kept_vector, _mm256_cvtps_pd(_mm256_castps256_ps128(e_kept)));
    kept_vector = _mm256_add_pd(kept_vector, _mm256_cvtps_pd(_mm256_extractf128_ps(e_kept, 1)));
  }
  alignas(32) double lanes[4], kept_lanes[4];
  _mm256_store_pd(lanes, total_vector);
  _mm256_store_pd(kept_lanes, kept_vector);
  for (int lane = 0; lane < 4; ++lane) {
    total += lanes[lane];
    kept += kept_lanes[lane];
  }
#endif
  for (; i < n; ++i) {
    const float e = std::exp(l[i] - m);
    l[i] = e;
    total += e;
    if (e >= floor) kept += e;
  }
  *kept_sum = kept;
  return total;
}

// The order of the candidates: larger key first, then lower index.
struct Better {
  const float* key;
  bool operator()(int32_t a, int32_t b) const { return key[a] > key[b] || (key[a] == key[b] && a < b); }
};

// The best (at most) r of the indices i ∈ [0, n) with key[i] ≥ floor, best first, into index[0, r).
// One pass; once the heap of r is full most elements cost a single comparison.
int64_t select_best(const float* key, int64_t n, int64_t r, float floor, int32_t* index) {
  const Better better{key};
  int64_t size = 0, i = 0;
  for (; i < n && size < r; ++i)
    if (key[i] >= floor) {
      index[size++] = (int32_t)i;
      std::push_heap(index, index + size, better);  // worst of the kept at the front
    }
  if (size == r && r > 0) {
    float threshold = key[index[0]];
    for (; i < n; ++i)
      if (key[i] > threshold) {  // equal keys lose: their index is higher
        std::pop_heap(index, index + r, better);
        index[r - 1] = (int32_t)i;
        std::push_heap(index, index + r, better);
        threshold = key[index[0]];
      }
  }
  std::sort_heap(index, index + size, better);
  return size;
}

// The candidates (e ≥ floor) in descending order, sorted only as far as a walk needs.
// First round: the best 64 by one heap scan, enough for most language-model steps. Past them, one
// pass builds a histogram of the probability mass by the top bits of e (1/16 of an octave per
// bucket), finds the bucket where the mass the walk needs is reached, and sorts only the candidates
// from there up. Those are packed as 64-bit keys, e's bits above the complement of the index (e ≥ 0,
// so its bits order like the value): descending key order is exactly (e descending, index ascending).
class DescendingOrder {
 public:
  // Already complete: index[0, count) sorted.
  DescendingOrder(const float* e, int32_t* index, int64_t count)
      : e_(e), index_(index), vocab_(0), floor_(0), count_(count), complete_(true) {}
  // Over all of [0, vocab).
  DescendingOrder(const float* e, int32_t* index, int64_t vocab, float floor)
      : e_(e), index_(index), vocab_(vocab), floor_(floor) {
    count_ = select_best(e, vocab, kFirstRound, floor, index);
    complete_ = count_ < kFirstRound;
  }
  // Whether a j-th candidate exists; `mass` is the Σ e of the prefix the walk is trying to reach.
  bool has(int64_t j, double mass) {
    if (j < count_) return true;
    if (!complete_) extend(j, mass);
    return j < count_;
  }
  int32_t token(int64_t j) const { return packed_ ? (int32_t)~(uint32_t)keys_[j] : index_[j]; }
  float probability(int64_t j) const { return packed_ ? bits_f32((uint32_t)(keys_[j] >> 32)) : e_[index_[j]]; }

 private:
  static constexpr int64_t kFirstRound = 64;
  static constexpr int kBucketShift = 19;                        // keeps sign, exponent, 4 mantissa bits
  static constexpr int kBuckets = (0x3f800000 >> kBucketShift) + 1;  // e ≤ 1

  static std::vector<uint64_t>& key_buffer() {
    static thread_local std::vector<uint64_t> keys;
    return keys;
  }

  // Sorts every candidate with e in a bucket ≥ lowest_bucket into keys_[0, count_).
  void pack_from(int lowest_bucket) {
    std::vector<uint64_t>& buffer = key_buffer();
    if ((int64_t)buffer.size() < vocab_) buffer.resize((size_t)vocab_);
    keys_ = buffer.data();
    const uint32_t lowest_bits = (uint32_t)lowest_bucket << kBucketShift;
    int64_t count = 0;
    for (int64_t i = 0; i < vocab_; ++i) {
      const uint32_t bits = f32_bits(e_[i]);
      if (bits >= lowest_bits && e_[i] >= floor_) keys_[count++] = (uint64_t)bits << 32 | (uint32_t)~(uint32_t)i;
    }
    std::sort(keys_, keys_ + count, std::greater<uint64_t>());
    count_ = count;
    packed_ = true;
  }

  void extend(int64_t j, double mass) {
    if (!packed_) {
      double histogram[kBuckets] = {};
      for (int64_t i = 0; i < vocab_; ++i)
        if (e_[i] >= floor_) histogram[f32_bits(e_[i]) >> kBucketShift] += e_[i];
      // Stops one bucket below the crossing: a margin so rounding in the walk's own sum cannot fall short.
      int bucket = kBuckets - 1;
      double above = 0;
      while (bucket > 0 && above < mass) above += histogram[bucket--];
      pack_from(bucket);
      if (j < count_) return;
    }
    pack_from(0);  // the walk needed more than the histogram promised: everything
    complete_ = true;
  }

  const float* e_;
  int32_t* index_;
  int64_t vocab_;
  float floor_;
  int64_t count_ = 0;
  bool complete_ = false, packed_ = false;
  uint64_t* keys_ = nullptr;
};

}  // namespace

void argmax(const float* logits, int64_t rows, int64_t vocab, int32_t* out) {
  if (vocab <= 0) {
    for (int64_t r = 0; r < rows; ++r) out[r] = 0;
    return;
  }
  const int64_t min_chunk = std::max<int64_t>(1, 65536 / vocab);
  parallel_for(rows, min_chunk, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) out[r] = (int32_t)argmax_row(logits + r * vocab, vocab);
  });
}

int32_t sample(const float* logits, int64_t vocab, const SamplingParams& params, float u, float* scratch) {
  if (vocab <= 0) return 0;

  float* l = scratch;
  // The second half of scratch holds candidate indices (int32, the size of a float).
  int32_t* index = reinterpret_cast<int32_t*>(scratch + vocab);

  for (int64_t i = 0; i < vocab; ++i) l[i] = std::isnan(logits[i]) ? kNegativeInfinity : logits[i];
  const float penalty = params.repetition_penalty;
  if (penalty != 1.0f && params.penalty_tokens) {
    // Computed from the original logit, so a token listed twice is still penalised once.
    for (int64_t j = 0; j < params.penalty_count; ++j) {
      const int32_t t = params.penalty_tokens[j];
      if (t < 0 || t >= vocab || std::isnan(logits[t])) continue;
      l[t] = logits[t] > 0.0f ? logits[t] / penalty : logits[t] * penalty;
    }
  }
  if (!(params.temperature > 0.0f)) return (int32_t)argmax_row(l, vocab);
  for (int64_t i = 0; i < vocab; ++i) l[i] /= params.temperature;

  const bool use_top_k = params.top_k > 0 && params.top_k < vocab;
  // min_p above 1 would drop even the most likely token; the largest e is exactly 1.
  const float min_p = params.min_p > 0.0f ? std::min(params.min_p, 1.0f) : 0.0f;
  double total = 0.0, kept_total = 0.0;
  int64_t top_k_count = 0;
  if (use_top_k) {
    top_k_count = select_best(l, vocab, params.top_k, kNegativeInfinity, index);
    const float m = l[index[0]];
    if (!std::isfinite(m)) return (int32_t)argmax_row(l, vocab);
    for (int64_t j = 0; j < top_k_count; ++j) {
      const float e = std::exp(l[index[j]] - m);
      l[index[j]] = e;
      total += e;
      if (e >= min_p) kept_total += e;
    }
    // Re-sorted by e: two logits can round to the same probability, which is then a tie.
    std::sort(index, index + top_k_count, Better{l});
  } else {
    const int64_t best = argmax_row(l, vocab);
    const float m = l[best];
    if (!std::isfinite(m)) return (int32_t)best;
    total = exp_in_place(l, vocab, m, min_p, &kept_total);
  }
  // Candidates after min_p (e ≥ min_p, the largest e being 1), in descending order.
  DescendingOrder order = use_top_k ? DescendingOrder(l, index, top_k_count) : DescendingOrder(l, index, vocab, min_p);
  int64_t kept = -1;  // −1: all candidates
  if (use_top_k && min_p > 0.0f) {
    int64_t j = 0;
    while (j < top_k_count && l[index[j]] >= min_p) ++j;
    kept = j;
  }
  if (params.top_p < 1.0f) {
    const double target = (double)params.top_p * total;
    double sum = 0.0;
    int64_t j = 0;
    while ((kept < 0 || j < kept) && order.has(j, target)) {
      sum += order.probability(j);
      ++j;
      if (sum >= target) break;
    }
    kept = j;
    kept_total = sum;
  }

  const double target = (double)u * kept_total;
  double sum = 0.0;
  int64_t j = 0;
  int32_t chosen = order.token(0);
  while ((kept < 0 || j < kept) && order.has(j, target)) {
    chosen = order.token(j);
    sum += order.probability(j);
    if (sum > target) break;
    ++j;
  }
  return chosen;
}

}  // namespace mssm::cpu::MSSM_LEVEL
