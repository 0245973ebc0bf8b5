// argmax and sample against references that sort the whole vocabulary in double.
//
// The reference applies the pipeline of kernels.h literally: penalty on each distinct token, divide by
// the temperature, sort every token by logit (ties: lower index), keep top_k, softmax, top_p on the
// cumulative sum, min_p against the largest probability, renormalise, inverse CDF at u. The kernel
// works in fp32, so a draw whose u (or a top_p / min_p threshold) lies within 1e-5 of a boundary of the
// reference's CDF is counted as ambiguous and not compared; each case reports how many were.
#include <algorithm>
#include <chrono>
#include <numeric>
#include <set>

#include "test_util.h"

using namespace mssm;
using namespace mssm::test;
using cpu::SamplingParams;

namespace {

// The draw a given state gives (kernels.h's sampling_draw).
double uniform_from(uint64_t state) { return (double)cpu::sampling_draw(&state); }
// The next draw of a stream, as callers of the kernel make it.
float draw(uint64_t* state) { return cpu::sampling_draw(state); }

int32_t reference_argmax(const float* v, int64_t n, bool last_on_tie = false) {
  int32_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if ((double)v[i] > (double)v[best] || (last_on_tie && v[i] == v[best])) best = (int32_t)i;
  return best;
}

struct Kept {
  std::vector<int32_t> tokens;  // descending probability
  std::vector<double> probability;  // renormalised over the kept tokens
  bool ambiguous = false;       // a top_p or min_p threshold within 1e-5 of a probability
};

std::vector<double> penalised(const std::vector<float>& logits, const SamplingParams& p) {
  std::vector<double> l(logits.begin(), logits.end());
  std::set<int32_t> distinct(p.penalty_tokens, p.penalty_tokens + p.penalty_count);
  for (int32_t t : distinct)
    if (t >= 0 && t < (int32_t)l.size()) l[t] = l[t] > 0 ? l[t] / p.repetition_penalty : l[t] * p.repetition_penalty;
  return l;
}

Kept reference_filter(const std::vector<float>& logits, const SamplingParams& p) {
  const int64_t vocab = (int64_t)logits.size();
  std::vector<double> l = penalised(logits, p);
  for (double& v : l) v /= p.temperature;
  std::vector<int32_t> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
  if (p.top_k > 0 && p.top_k < vocab) order.resize(p.top_k);
  const double m = l[order[0]];
  std::vector<double> e(order.size());
  double total = 0;
  for (size_t j = 0; j < order.size(); ++j) total += e[j] = std::exp(l[order[j]] - m);
  Kept kept;
  size_t count = order.size();
  if (p.top_p < 1.0f) {
    double sum = 0;
    size_t j = 0;
    while (j < order.size()) {
      sum += e[j++];
      if (std::fabs(sum / total - p.top_p) < 1e-5) kept.ambiguous = true;
      if (sum >= p.top_p * total) break;
    }
    count = std::max<size_t>(j, 1);
  }
  size_t j = 0;
  for (; j < count; ++j) {
    if (p.min_p > 0 && std::fabs(e[j] - p.min_p) < 1e-5) kept.ambiguous = true;
    if (e[j] < p.min_p) break;
  }
  count = std::max<size_t>(j, 1);
  double sum = 0;
  for (size_t i = 0; i < count; ++i) sum += e[i];
  for (size_t i = 0; i < count; ++i) {
    kept.tokens.push_back(order[i]);
    kept.probability.push_back(e[i] / sum);
  }
  return kept;
}

// Inverse CDF at u; ambiguous when u is within 1e-5 of either edge of the chosen bin.
int32_t reference_draw(const Kept& kept, double u, bool* ambiguous) {
  double cdf = 0;
  for (size_t j = 0; j < kept.tokens.size(); ++j) {
    const double before = cdf;
    cdf += kept.probability[j];
    if (cdf > u || j + 1 == kept.tokens.size()) {
      // Two probabilities within fp32 rounding of each other may be a tie (lower index first) in the
      // kernel's fp32 e and not in this double reference: their order is not compared.
      auto near_tie = [&](size_t a, size_t b) {
        return b < kept.tokens.size() && std::fabs(kept.probability[a] - kept.probability[b]) <= 1e-6 * kept.probability[a];
      };
      *ambiguous = kept.ambiguous || (j > 0 && u - before < 1e-5) || (j + 1 < kept.tokens.size() && cdf - u < 1e-5) ||
                   (j > 0 && near_tie(j, j - 1)) || near_tie(j, j + 1);
      return kept.tokens[j];
    }
  }
  return -1;
}

struct Case {
  std::string name;
  std::vector<float> logits;
  std::vector<int32_t> penalty_tokens;
  SamplingParams params;
  std::vector<uint64_t> seeds;
  std::vector<int32_t> expected;
  std::vector<bool> ambiguous;
};

void test_argmax() {
  Rng rng(11);
  struct Rows { int64_t rows, vocab; std::vector<float> logits; std::vector<int32_t> want; };
  std::vector<Rows> cases;
  int ties_that_matter = 0;
  for (int64_t vocab : {1, 2, 7, 15, 16, 17, 31, 33, 64, 1000, 50257}) {
    for (int64_t rows : {1, 3}) {
      Rows c{rows, vocab, rng.normals((size_t)(rows * vocab), 2.0f), {}};
      for (int64_t r = 0; r < rows; ++r) {
        float* row = c.logits.data() + r * vocab;
        // Row 1: the maximum repeated at a later position (another lane, or the scalar tail);
        // row 2: the maximum repeated at an earlier position too.
        if (r >= 1 && vocab >= 2) {
          const int32_t at = reference_argmax(row, vocab);
          const int64_t other = r == 1 ? vocab - 1 - (at == vocab - 1) : (at > 0 ? at / 3 : 1);
          row[other] = row[at];
          if (reference_argmax(row, vocab, true) != reference_argmax(row, vocab)) ++ties_that_matter;
        }
        c.want.push_back(reference_argmax(row, vocab));
      }
      cases.push_back(std::move(c));
    }
  }
  // A row of −∞ and a NaN that must never win.
  Rows special{2, 40, std::vector<float>(80, -INFINITY), {0, 0}};
  special.logits[40 + 5] = NAN;
  special.logits[40 + 30] = -1e30f;
  special.want = {0, 30};
  cases.push_back(special);
  MSSM_CHECK(ties_that_matter >= 15, "only %d tie rows where the lowest-index rule matters", ties_that_matter);

  for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
    for (const Rows& c : cases) {
      std::vector<int32_t> got((size_t)c.rows, -7);
      k.argmax(c.logits.data(), c.rows, c.vocab, got.data());
      for (int64_t r = 0; r < c.rows; ++r)
        MSSM_CHECK(got[r] == c.want[r], "%s argmax vocab %lld row %lld: got %d want %d", label.c_str(),
                   (long long)c.vocab, (long long)r, got[r], c.want[r]);
    }
  });
}

// Greedy decoding, the repetition penalty's rule, the rng contract.
void test_greedy_and_penalty() {
  for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
    const char* at = label.c_str();
    std::vector<float> scratch(64);
    Rng rng(5);
    std::vector<float> logits = rng.normals(29, 1.5f);
    const std::vector<float> original = logits;
    const int32_t best = reference_argmax(logits.data(), 29);
    for (float temperature : {0.0f, -1.0f}) {
      SamplingParams p;
      p.temperature = temperature;
      uint64_t state = 77;
      MSSM_CHECK(k.sample(logits.data(), 29, p, draw(&state), scratch.data()) == best, "%s greedy is argmax", at);
    }
    MSSM_CHECK(logits == original, "%s logits not modified", at);

    // HF rule: positive logits divided, negative multiplied; a token listed three times counts once.
    {
      std::vector<float> l = {3.0f, 1.2f, -5.0f};
      SamplingParams p;
      p.temperature = 0;
      p.repetition_penalty = 2.0f;
      std::vector<int32_t> once = {0, 0, 0, 99, -1};  // out-of-range tokens ignored
      p.penalty_tokens = once.data();
      p.penalty_count = (int64_t)once.size();
      uint64_t state = 1;
      MSSM_CHECK(k.sample(l.data(), 3, p, draw(&state), scratch.data()) == 0, "%s 3/2 > 1.2: penalised once", at);
      p.repetition_penalty = 3.0f;
      MSSM_CHECK(k.sample(l.data(), 3, p, draw(&state), scratch.data()) == 1, "%s 3/3 < 1.2", at);
      std::vector<float> negative = {-0.5f, -0.8f, -0.9f};
      std::vector<int32_t> first = {0};
      p.penalty_tokens = first.data();
      p.penalty_count = 1;
      p.repetition_penalty = 2.0f;
      MSSM_CHECK(k.sample(negative.data(), 3, p, draw(&state), scratch.data()) == 1, "%s -0.5·2 < -0.8", at);
      p.repetition_penalty = 1.5f;
      MSSM_CHECK(k.sample(negative.data(), 3, p, draw(&state), scratch.data()) == 0, "%s -0.5·1.5 > -0.8", at);
    }
    // NaN logits never chosen, greedy or sampled.
    {
      std::vector<float> l = {NAN, 0.5f, NAN, 0.4f};
      SamplingParams p;
      p.temperature = 0;
      uint64_t state = 3;
      MSSM_CHECK(k.sample(l.data(), 4, p, draw(&state), scratch.data()) == 1, "%s NaN skipped by greedy", at);
      p.temperature = 1;
      for (int i = 0; i < 50; ++i) {
        int32_t t = k.sample(l.data(), 4, p, draw(&state), scratch.data());
        MSSM_CHECK(t == 1 || t == 3, "%s NaN drawn (%d)", at, t);
      }
    }
    // The generator is splitmix64 (its first output from 0 is 0xe220a8397b1dcdaf), one step a draw, and
    // a draw is that output's top 24 bits over 2^24.
    {
      uint64_t state = 0;
      const float u = cpu::sampling_draw(&state);
      MSSM_CHECK(state == 0x9e3779b97f4a7c15ull && u == 14819496.0f / 16777216.0f, "%s the draw's stream", at);
    }
    // Same draw, same token; successive draws of a stream give different tokens.
    {
      SamplingParams p;
      p.top_k = 10;
      uint64_t a = 12345, b = 12345;
      int32_t ta = k.sample(logits.data(), 29, p, draw(&a), scratch.data());
      int32_t tb = k.sample(logits.data(), 29, p, draw(&b), scratch.data());
      MSSM_CHECK(ta == tb, "%s same draw, same token", at);
      int distinct = 0;
      std::set<int32_t> seen;
      for (int i = 0; i < 40; ++i) seen.insert(k.sample(logits.data(), 29, p, draw(&a), scratch.data()));
      distinct = (int)seen.size();
      MSSM_CHECK(distinct > 1, "%s successive draws vary (%d distinct)", at, distinct);
    }
  });
}

// Draws compared one by one against the reference's inverse CDF at the same u.
void test_draws_match_reference() {
  Rng rng(2024);
  std::vector<Case> cases;
  auto add = [&](const std::string& name, int64_t vocab, float scale, SamplingParams p, int seeds,
                 std::vector<int32_t> penalty = {}) {
    Case c;
    c.name = name;
    c.logits = rng.normals((size_t)vocab, scale);
    c.penalty_tokens = std::move(penalty);
    c.params = p;
    for (int s = 0; s < seeds; ++s) c.seeds.push_back(rng.next());
    cases.push_back(std::move(c));
  };
  auto params = [](float temperature, int32_t top_k, float top_p, float min_p) {
    SamplingParams p;
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    return p;
  };
  for (int64_t vocab : {1, 2, 5, 31, 257}) {
    for (int32_t top_k : {0, 1, 3, (int32_t)vocab - 1, (int32_t)vocab + 5})
      for (float top_p : {1.0f, 0.9f, 0.4f, 0.0f})
        for (float min_p : {0.0f, 0.05f, 0.4f})
          add("v" + std::to_string(vocab) + " k" + std::to_string(top_k) + " p" + std::to_string(top_p) + " m" +
                  std::to_string(min_p),
              vocab, 2.0f, params(0.8f, top_k, top_p, min_p), 40);
  }
  // Nearly flat distributions: the walk goes far past the first 64 candidates (lazy rounds).
  add("flat 3000", 3000, 0.05f, params(1.0f, 0, 1.0f, 0.0f), 200);
  add("flat 3000 top_p", 3000, 0.05f, params(1.0f, 0, 0.97f, 0.0f), 100);
  add("flat 3000 min_p", 3000, 0.3f, params(1.0f, 0, 1.0f, 0.6f), 100);
  add("flat 3000 top_k 700", 3000, 0.05f, params(1.3f, 700, 0.8f, 0.0f), 100);
  // A language-model sized vocabulary.
  add("50257 T1", 50257, 3.0f, params(1.0f, 0, 1.0f, 0.0f), 30);
  add("50257 top_k 40", 50257, 3.0f, params(0.7f, 40, 1.0f, 0.0f), 30);
  add("50257 top_p", 50257, 3.0f, params(1.0f, 0, 0.95f, 0.0f), 30);
  add("50257 min_p", 50257, 3.0f, params(1.0f, 0, 1.0f, 0.02f), 30);
  add("50257 all", 50257, 3.0f, params(1.4f, 100, 0.9f, 0.01f), 30);
  // The penalty inside the sampled path (token 3 listed twice).
  {
    SamplingParams p = params(1.0f, 0, 1.0f, 0.0f);
    p.repetition_penalty = 1.8f;
    add("penalty", 9, 1.0f, p, 200, {3, 3, 0, 7, 8});
  }

  int compared = 0, skipped = 0;
  for (Case& c : cases) {
    c.params.penalty_tokens = c.penalty_tokens.data();
    c.params.penalty_count = (int64_t)c.penalty_tokens.size();
    const Kept kept = reference_filter(c.logits, c.params);
    for (uint64_t seed : c.seeds) {
      bool ambiguous = false;
      c.expected.push_back(reference_draw(kept, uniform_from(seed), &ambiguous));
      c.ambiguous.push_back(ambiguous);
      (ambiguous ? skipped : compared)++;
    }
  }
  std::printf("  draws: %d compared per level, %d ambiguous (within 1e-5 of a boundary) skipped\n", compared,
              skipped);
  MSSM_CHECK(skipped * 100 < compared, "too many ambiguous draws (%d of %d)", skipped, compared);

  for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
    for (const Case& c : cases) {
      std::vector<float> scratch(2 * c.logits.size());
      int wrong = 0, first_got = -1, first_want = -1;
      for (size_t s = 0; s < c.seeds.size(); ++s) {
        if (c.ambiguous[s]) continue;
        uint64_t state = c.seeds[s];
        const int32_t got = k.sample(c.logits.data(), (int64_t)c.logits.size(), c.params, draw(&state), scratch.data());
        if (got != c.expected[s] && wrong++ == 0) {
          first_got = got;
          first_want = c.expected[s];
        }
      }
      MSSM_CHECK(wrong == 0, "%s %s: %d draws differ (first: got %d want %d)", label.c_str(), c.name.c_str(), wrong,
                 first_got, first_want);
    }
  });
}

// Frequencies of many successive draws against the filtered, renormalised probabilities.
// Chi-square over the kept tokens with df = kept − 1 ≤ 7: the bound 40 has p < 1e-5 under the null,
// and any token outside the kept set is a failure outright.
void test_frequencies() {
  const std::vector<float> logits = {1.2f, -0.3f, 2.1f, 0.7f, 2.1f, -2.0f, 0.1f, 1.9f, -1.0f, 0.4f, 1.0f};
  const int64_t vocab = (int64_t)logits.size();
  struct Setting { SamplingParams params; const char* name; };
  std::vector<Setting> settings;
  {
    SamplingParams p;
    p.temperature = 0.9f;
    p.top_k = 8;
    p.top_p = 0.85f;
    settings.push_back({p, "top_k 8, top_p 0.85"});
    SamplingParams q;
    q.temperature = 1.5f;
    q.min_p = 0.3f;
    settings.push_back({q, "T 1.5, min_p 0.3"});
  }
  const int draws = 20000;
  for (const Setting& s : settings) {
    const Kept kept = reference_filter(logits, s.params);
    std::vector<double> full(vocab, 0.0);  // the unfiltered softmax: the test must reject it
    {
      double m = *std::max_element(logits.begin(), logits.end()) / s.params.temperature, z = 0;
      for (int64_t i = 0; i < vocab; ++i) z += full[i] = std::exp(logits[i] / s.params.temperature - m);
      for (double& f : full) f /= z;
    }
    MSSM_CHECK(kept.tokens.size() >= 3 && kept.tokens.size() < (size_t)vocab, "%s keeps %zu tokens", s.name,
               kept.tokens.size());
    for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
      std::vector<float> scratch(2 * vocab);
      std::vector<int> counts(vocab, 0);
      uint64_t state = 42;
      for (int i = 0; i < draws; ++i) ++counts[k.sample(logits.data(), vocab, s.params, draw(&state), scratch.data())];
      double chi2 = 0, chi2_unfiltered = 0;
      int outside = draws;
      for (size_t j = 0; j < kept.tokens.size(); ++j) {
        const double expected = draws * kept.probability[j];
        const double d = counts[kept.tokens[j]] - expected;
        chi2 += d * d / expected;
        outside -= counts[kept.tokens[j]];
      }
      for (int64_t i = 0; i < vocab; ++i) {
        const double expected = draws * full[i];
        chi2_unfiltered += (counts[i] - expected) * (counts[i] - expected) / expected;
      }
      MSSM_CHECK(outside == 0, "%s %s: %d draws outside the kept set", label.c_str(), s.name, outside);
      MSSM_CHECK(chi2 < 40.0, "%s %s: chi-square %.1f (df %zu)", label.c_str(), s.name, chi2, kept.tokens.size() - 1);
      MSSM_CHECK(chi2_unfiltered > 400.0, "%s %s: the unfiltered distribution fits too (chi-square %.1f)",
                 label.c_str(), s.name, chi2_unfiltered);
    }
    );
  }
}

// Not a benchmark: one line so a regression to a full sort of the vocabulary shows.
void report_speed() {
  Rng rng(9);
  const int64_t vocab = 50257;
  std::vector<float> logits = rng.normals(vocab, 3.0f), scratch(2 * vocab);
  const cpu::KernelTable& k = cpu::kernels();
  for (int32_t top_k : {0, 40}) {
    SamplingParams p;
    p.top_k = top_k;
    p.top_p = top_k ? 1.0f : 0.95f;
    uint64_t state = 1;
    const int reps = 50;
    auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) k.sample(logits.data(), vocab, p, draw(&state), scratch.data());
    double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() / reps;
    std::printf("  sample vocab %lld top_k %d top_p %.2f (%s): %.0f us\n", (long long)vocab, top_k, p.top_p, k.level,
                us);
  }
}

}  // namespace

int main() {
  test_argmax();
  test_greedy_and_penalty();
  test_draws_match_reference();
  test_frequencies();
  report_speed();
  return finish("test_sampling");
}
