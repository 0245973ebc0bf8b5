// The sampler's options as the bindings read them (sample in ops.cpp, a sampling step in cuda.cpp):
// temperature, topK, topP, minP, repetitionPenalty, and penaltyTokens (int32 [rows][penaltyCount],
// each in [0, vocab)) or null, checked with the messages lib/ops/sampling.ts's users see.
#pragma once
#include <string>

#include "args.h"
#include "cpu/kernels.h"

namespace mssm::napi {

// penalty_tokens points into the caller's ArrayBuffer (valid while the call holds it).
inline cpu::SamplingParams read_sampling_params(const Args& a, int64_t vocab, int64_t rows) {
  cpu::SamplingParams p;
  p.temperature = (float)a.number("temperature", 1.0);
  p.top_k = (int32_t)a.integer("topK", 0, 1 << 30);
  p.top_p = (float)a.number("topP", 1.0);
  p.min_p = (float)a.number("minP", 0.0);
  p.repetition_penalty = (float)a.number("repetitionPenalty", 1.0);
  if (!(p.temperature >= 0)) a.fail("temperature must be >= 0");
  if (!(p.top_p > 0 && p.top_p <= 1)) a.fail("topP must be in (0, 1]");
  if (!(p.min_p >= 0 && p.min_p <= 1)) a.fail("minP must be in [0, 1]");
  if (!(p.repetition_penalty > 0)) a.fail("repetitionPenalty must be > 0");
  if (!a.is_null("penaltyTokens")) {
    p.penalty_count = a.integer("penaltyCount", 0, 1ll << 31);
    p.penalty_tokens = a.i32("penaltyTokens", rows * p.penalty_count);
    for (int64_t i = 0; i < rows * p.penalty_count; ++i) {
      if (p.penalty_tokens[i] < 0 || p.penalty_tokens[i] >= vocab) {
        a.fail("penalty token " + std::to_string(p.penalty_tokens[i]) + " is outside [0, " + std::to_string(vocab) +
               ")");
      }
    }
  }
  return p;
}

}  // namespace mssm::napi
