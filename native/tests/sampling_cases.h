// The random cases of the device sampler's tests (test_cuda_sampling on a GPU, test_sampling_blocks
// on emulated blocks), with the CPU kernels' answers as the reference.
//  - argmax: 4 rows of `vocab` logits: NaN every third element; all −∞ after a NaN; ties at the top;
//    the largest last.
//  - sample: `rows` rows of a vocabulary of 1 to max_vocab logits at scales 0.5, 3 or 10, some trials
//    with repeated values, −∞ stretches, rows of signed zeros; temperature 0 or 0.3 to 2.3; top_k; top_p;
//    min_p; a repetition penalty over 9 tokens, one repeated; each row with its own draw u.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/kernels.h"
#include "test_util.h"

namespace mssm::test {

inline std::vector<float> argmax_case(Rng& rng, int64_t vocab) {
  auto logits = rng.normals(4 * vocab, 3);
  for (int64_t i = 0; i < vocab; i += 3) logits[i] = NAN;               // row 0: NaN every third
  for (int64_t i = 0; i < vocab; ++i) logits[vocab + i] = -INFINITY;     // row 1: all −∞
  for (int64_t i = 0; i < vocab; i += 2) logits[2 * vocab + i] = 100.0f;  // row 2: ties at the top
  logits[vocab] = NAN;                                                   // row 1: NaN first, then −∞
  if (vocab > 1) logits[3 * vocab + vocab - 1] = 1e30f;                  // row 3: the last wins
  return logits;
}

struct SamplingCase {
  int64_t vocab = 0, rows = 0, count = 0;  // count: penalty tokens a row
  std::vector<float> logits, u;            // [rows, vocab], [rows]
  cpu::SamplingParams params;              // penalty_tokens unset: see `penalty`
  std::vector<int32_t> penalty;            // [rows][count]
  std::vector<int32_t> want;               // the CPU sampler's token per row
};

inline SamplingCase sampling_case(Rng& rng, int trial, int64_t rows, int64_t max_vocab, const cpu::KernelTable& ref) {
  SamplingCase c;
  const int64_t V = 1 + (int64_t)(rng.next() % max_vocab);
  c.vocab = V, c.rows = rows;
  const float scale = trial % 3 == 0 ? 0.5f : trial % 3 == 1 ? 3.0f : 10.0f;
  c.logits = rng.normals(rows * V, scale);
  std::vector<float>& logits = c.logits;
  if (trial % 7 == 0)
    for (int64_t i = 0; i < rows * V; i += 5) logits[i] = logits[0];
  if (trial % 11 == 0)
    for (int64_t i = 1; i < rows * V; i += 3) logits[i] = -INFINITY;
  if (trial % 17 == 0)  // signed zeros compare equal: top_k ties by index, whatever the sign
    for (int64_t i = 0; i < rows * V; ++i) logits[i] = (i % 4 == 0) ? -0.0f : (i % 4 == 1 ? 0.0f : -5.0f);
  cpu::SamplingParams& p = c.params;
  p.temperature = trial % 13 == 0 ? 0.0f : 0.3f + (float)(rng.next() % 100) / 50.0f;
  p.top_k = trial % 4 == 0 ? 0 : (int32_t)(1 + rng.next() % 60);
  p.top_p = trial % 5 == 0 ? 1.0f : 0.05f + (float)(rng.next() % 95) / 100.0f;
  p.min_p = trial % 6 == 0 ? (float)(rng.next() % 20) / 100.0f : 0.0f;
  c.count = trial % 3 == 0 ? 9 : 0;
  c.penalty.resize(rows * c.count);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < c.count; ++j)
      c.penalty[r * c.count + j] = j == c.count - 1 ? c.penalty[r * c.count] : (int32_t)(rng.next() % V);
  if (c.count) p.repetition_penalty = 1.3f;
  p.penalty_count = c.count;
  c.want.resize(rows);
  c.u.resize(rows);
  std::vector<float> scratch(2 * V);
  uint64_t rng_state = 977ull * trial + 5;
  for (int64_t r = 0; r < rows; ++r) {
    cpu::SamplingParams pr = p;
    pr.penalty_tokens = c.count ? c.penalty.data() + r * c.count : nullptr;
    c.u[r] = cpu::sampling_draw(&rng_state);
    c.want[r] = ref.sample(logits.data() + r * V, V, pr, c.u[r], scratch.data());
  }
  return c;
}

}  // namespace mssm::test
