// moe_route and moe_experts against per-token references in double.
//
// Route: scores (softmax / sigmoid) in double, top-k by a full sort (ties: lower index), optional
// renormalisation; the chosen indices must match exactly and the weights within 1e-5 relative.
// Experts: a naive loop over every (token, slot) that dequantises the weights with dtype.h's scalars
// and accumulates in double. Tolerance: 1e-5 relative to |want| + 0.1·RMS(out), i.e. 1e-6·RMS
// absolute for elements that cancel to near zero (each is a sum over hidden of products that are each
// sums over dim, so fp32 rounding scales with the terms, not with the result); bf16 and q8_0 weights are
// dequantised exactly by the reference, so they get the same bound, loosened to 2e-5 for their longer
// sums; except at the avx512bf16 level, whose bf16 products round the activations to bf16: there the
// error's RMS must stay within 1e-2 and its largest element within 5e-2 of the output's RMS. Results
// must be bit-identical at 1 and N threads.
#include <algorithm>
#include <numeric>

#include "../core/dtype.h"
#include "test_util.h"

using namespace mssm;
using namespace mssm::test;
using cpu::Activation;
using cpu::MoeExpertsArgs;
using cpu::MoeScoring;

namespace {

struct Route {
  std::vector<float> weights;
  std::vector<int32_t> indices;
  std::vector<int32_t> counts;
};

Route reference_route(const std::vector<float>& logits, int64_t tokens, int64_t experts, int64_t k,
                      MoeScoring scoring, bool renormalize) {
  Route r;
  r.counts.assign(experts, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = logits.data() + t * experts;
    const std::vector<double> p = reference_scores(std::vector<double>(row, row + experts), scoring);
    const std::vector<int32_t> order = descending(p);
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += p[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      r.indices.push_back(order[j]);
      r.weights.push_back((float)(renormalize ? p[order[j]] / sum : p[order[j]]));
      ++r.counts[order[j]];
    }
  }
  return r;
}

void test_route() {
  Rng rng(31);
  struct Case { int64_t tokens, experts, k; MoeScoring scoring; bool renormalize; std::vector<float> logits; Route want; };
  std::vector<Case> cases;
  for (int64_t experts : {1, 2, 5, 8, 17})
    for (int64_t tokens : {1, 37})
      for (int64_t k = 1; k <= experts; k += (experts > 5 ? 3 : 1))
        for (MoeScoring scoring : {MoeScoring::softmax, MoeScoring::sigmoid})
          for (bool renormalize : {false, true}) {
            Case c{tokens, experts, k, scoring, renormalize, rng.normals((size_t)(tokens * experts), 2.0f), {}};
            // Ties: token 0 gets two equal maxima, so the lower-index rule decides the first slot.
            if (experts >= 3) c.logits[2] = c.logits[1] = *std::max_element(c.logits.begin(), c.logits.begin() + experts) + 0.5f;
            c.want = reference_route(c.logits, tokens, experts, k, scoring, renormalize);
            cases.push_back(std::move(c));
          }
  for_each_level([&](const cpu::KernelTable& kt, const std::string& label) {
    for (const Case& c : cases) {
      std::vector<float> weights(c.tokens * c.k, -1.0f);
      std::vector<int32_t> indices(c.tokens * c.k, -1), counts(c.experts, -1);
      kt.moe_route(c.logits.data(), c.tokens, c.experts, c.k, c.scoring, c.renormalize, weights.data(), indices.data(),
                   counts.data());
      char what[160];
      std::snprintf(what, sizeof what, "%s route T%lld E%lld k%lld %s%s", label.c_str(), (long long)c.tokens,
                    (long long)c.experts, (long long)c.k, c.scoring == MoeScoring::softmax ? "softmax" : "sigmoid",
                    c.renormalize ? " renorm" : "");
      MSSM_CHECK(indices == c.want.indices, "%s: chosen experts differ", what);
      MSSM_CHECK(counts == c.want.counts, "%s: counts differ", what);
      MSSM_CHECK(std::accumulate(counts.begin(), counts.end(), 0) == c.tokens * c.k, "%s: counts sum", what);
      // 1e-5 relative; the weights are probabilities, so a floor of 1e-7 only matters for tiny ones.
      expect_close(what, weights.data(), c.want.weights.data(), c.tokens * c.k, 1e-5, 1e-7);
    }
  });
  // The check can fail: the higher-index tie rule picks another expert for token 0.
  MSSM_CHECK(cases.back().want.indices[0] == 1, "tie case: lower index first in the reference");
}

// ---- experts ----

struct Weights {
  DType dtype;
  std::vector<uint8_t> bytes;
  std::vector<float> dequantised;  // what the reference multiplies by
};

Weights make_weights(Rng& rng, DType dtype, int64_t count, float scale) {
  Weights w{dtype, {}, {}};
  std::vector<float> v = rng.normals((size_t)count, scale);
  w.bytes.resize((size_t)dtype_bytes(dtype, count));
  w.dequantised.resize((size_t)count);
  if (dtype == DType::f32) {
    std::memcpy(w.bytes.data(), v.data(), count * 4);
    w.dequantised = v;
  } else if (dtype == DType::bf16 || dtype == DType::f16) {
    auto* h = reinterpret_cast<uint16_t*>(w.bytes.data());
    for (int64_t i = 0; i < count; ++i) {
      h[i] = dtype == DType::bf16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
      w.dequantised[i] = dtype == DType::bf16 ? bf16_to_f32(h[i]) : f16_to_f32(h[i]);
    }
  } else {  // q8_0
    auto* blocks = reinterpret_cast<BlockQ8_0*>(w.bytes.data());
    for (int64_t b = 0; b < count / kQ8BlockSize; ++b) {
      float amax = 0;
      for (int i = 0; i < kQ8BlockSize; ++i) amax = std::max(amax, std::fabs(v[b * kQ8BlockSize + i]));
      blocks[b].d = f32_to_f16(amax / 127.0f);
      const float d = f16_to_f32(blocks[b].d);
      for (int i = 0; i < kQ8BlockSize; ++i) {
        int q = (int)std::lround(v[b * kQ8BlockSize + i] / d);
        blocks[b].qs[i] = (int8_t)std::clamp(q, -127, 127);
        w.dequantised[b * kQ8BlockSize + i] = blocks[b].qs[i] * d;
      }
    }
  }
  return w;
}

std::vector<double> reference_experts(const MoeExpertsArgs& a, const Weights& fc1, const Weights& fc2) {
  const int64_t D = a.dim, H = a.hidden;
  std::vector<double> out((size_t)(a.tokens * D), 0.0);
  std::vector<double> h(2 * H), g(H);
  for (int64_t t = 0; t < a.tokens; ++t)
    for (int64_t slot = 0; slot < a.top_k; ++slot) {
      const int64_t e = a.indices[t * a.top_k + slot];
      const double weight = a.weights[t * a.top_k + slot];
      const float* w1 = fc1.dequantised.data() + e * 2 * H * D;
      const float* w2 = fc2.dequantised.data() + e * D * H;
      for (int64_t n = 0; n < 2 * H; ++n) {
        double s = a.fc1_bias ? a.fc1_bias[e * 2 * H + n] : 0.0;
        for (int64_t i = 0; i < D; ++i) s += (double)w1[n * D + i] * a.x[t * D + i];
        h[n] = s;
      }
      for (int64_t i = 0; i < H; ++i) g[i] = reference_activation(h[i], a.activation) * h[H + i];
      for (int64_t n = 0; n < D; ++n) {
        double s = a.fc2_bias ? a.fc2_bias[e * D + n] : 0.0;
        for (int64_t i = 0; i < H; ++i) s += (double)w2[n * H + i] * g[i];
        out[t * D + n] += weight * s;
      }
    }
  return out;
}

void test_experts() {
  Rng rng(77);
  struct Shape { int64_t tokens, dim, hidden, experts, top_k; DType dtype; };
  std::vector<Shape> shapes = {
      {1, 19, 13, 1, 1, DType::f32},   {37, 19, 13, 5, 2, DType::f32},  {37, 33, 7, 5, 3, DType::f32},
      {1, 64, 32, 5, 2, DType::f32},   {37, 23, 17, 5, 5, DType::bf16}, {2, 9, 5, 1, 1, DType::bf16},
      {37, 64, 32, 5, 2, DType::q8_0}, {1, 32, 64, 5, 2, DType::q8_0},
  };
  int cases = 0;
  for (const Shape& s : shapes)
    for (Activation act : {Activation::silu, Activation::gelu, Activation::gelu_tanh})
      for (bool bias : {false, true}) {
        const int64_t T = s.tokens, D = s.dim, H = s.hidden, E = s.experts, k = s.top_k;
        std::vector<float> x = rng.normals((size_t)(T * D));
        const Weights fc1 = make_weights(rng, s.dtype, E * 2 * H * D, 1.0f / std::sqrt((float)D));
        const Weights fc2 = make_weights(rng, s.dtype, E * D * H, 1.0f / std::sqrt((float)H));
        std::vector<float> b1 = rng.normals((size_t)(E * 2 * H), 0.3f), b2 = rng.normals((size_t)(E * D), 0.3f);
        // Routing from a real router so each token's experts are distinct; some experts stay idle.
        std::vector<float> logits = rng.normals((size_t)(T * E), 2.0f);
        std::vector<float> weights(T * k);
        std::vector<int32_t> indices(T * k), counts(E);
        cpu::kernels_for(CpuLevel::baseline)->moe_route(logits.data(), T, E, k, MoeScoring::softmax, true,
                                                        weights.data(), indices.data(), counts.data());
        MoeExpertsArgs a;
        a.tokens = T; a.dim = D; a.hidden = H; a.experts = E; a.top_k = k;
        a.x = x.data();
        a.fc1 = fc1.bytes.data(); a.fc1_dtype = s.dtype; a.fc1_bias = bias ? b1.data() : nullptr;
        a.fc2 = fc2.bytes.data(); a.fc2_dtype = s.dtype; a.fc2_bias = bias ? b2.data() : nullptr;
        a.activation = act;
        a.indices = indices.data();
        a.weights = weights.data();
        const std::vector<double> want = reference_experts(a, fc1, fc2);
        const double floor = 0.1 * rms(want.data(), (int64_t)want.size());
        const double tolerance = s.dtype == DType::f32 ? 1e-5 : 2e-5;
        std::vector<float> first_run;
        ++cases;
        for_each_level([&](const cpu::KernelTable& kt, const std::string& label) {
          std::vector<float> out(T * D, NAN);
          a.out = out.data();
          kt.moe_experts(a);
          char what[200];
          std::snprintf(what, sizeof what, "%s experts T%lld D%lld H%lld E%lld k%lld %s act%d bias%d", label.c_str(),
                        (long long)T, (long long)D, (long long)H, (long long)E, (long long)k, dtype_name(s.dtype),
                        (int)act, (int)bias);
          if (s.dtype == DType::bf16 && std::string(kt.level) == "avx512bf16") {
            // This level's bf16 products round the activations (x, then the hidden layer) to bf16.
            expect_rms_close(what, out.data(), want.data(), T * D, 1e-2, 5e-2);
          } else {
            expect_close(what, out.data(), want.data(), T * D, tolerance, floor);
          }
          // Thread counts alternate within a level (t1 then tN): the second must repeat the first.
          if (label.find("/t1") != std::string::npos) {
            first_run = out;
          } else {
            MSSM_CHECK(std::memcmp(first_run.data(), out.data(), out.size() * 4) == 0,
                       "%s: differs from the 1-thread result", what);
          }
        });
      }
  // The check can fail: dropping the second slot's contribution moves the result far outside tolerance.
  {
    const int64_t T = 3, D = 8, H = 4, E = 2, k = 2;
    std::vector<float> x = rng.normals(T * D);
    const Weights fc1 = make_weights(rng, DType::f32, E * 2 * H * D, 0.5f);
    const Weights fc2 = make_weights(rng, DType::f32, E * D * H, 0.5f);
    std::vector<int32_t> indices = {0, 1, 1, 0, 0, 1};
    std::vector<float> weights = {0.6f, 0.4f, 0.7f, 0.3f, 0.5f, 0.5f}, single = {0.6f, 0.0f, 0.7f, 0.0f, 0.5f, 0.0f};
    MoeExpertsArgs a;
    a.tokens = T; a.dim = D; a.hidden = H; a.experts = E; a.top_k = k;
    a.x = x.data(); a.fc1 = fc1.bytes.data(); a.fc2 = fc2.bytes.data();
    a.indices = indices.data(); a.weights = weights.data();
    const std::vector<double> want = reference_experts(a, fc1, fc2);
    a.weights = single.data();
    std::vector<float> out(T * D);
    a.out = out.data();
    cpu::kernels().moe_experts(a);
    ErrorStats e = compare(out.data(), want.data(), T * D, 1e-4 * rms(want.data(), T * D));
    MSSM_CHECK(e.max_rel > 1e-2, "a missing slot should be detected (max rel %.3g)", e.max_rel);
  }
  std::printf("  experts: %d shapes × activations × bias, every level at 1 and N threads\n", cases);
}

}  // namespace

int main() {
  test_route();
  test_experts();
  return finish("test_moe");
}
