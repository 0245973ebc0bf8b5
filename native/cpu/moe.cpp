// Mixture-of-experts MLP (BlackMamba's MoE block): the router and the grouped expert GLU MLPs.
//
// Glossary:
//   T  tokens            E  experts             k  top_k (experts chosen per token)
//   D  dim (model width) H  hidden (each expert's GLU width; fc1 produces 2·H)
//
// Router (per token t): p = softmax(logits_t) or sigmoid(logits_t) over E; keep the k largest
// (ties: lower index first), optionally renormalised to sum 1.
// Experts: for each (t, slot) with e = indices[t, slot]:
//   h = fc1[e]·x_t (+b1[e]);  g = act(h[:H]) ⊙ h[H:];  o = fc2[e]·g (+b2[e])
//   out_t = Σ_slot weights[t, slot] · o_(t, slot)
// The (t, slot) pairs are grouped by expert so each expert's weights stream through the cache once
// per call as the weight matrix of one matmul over all its tokens.
#include "level.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../core/threadpool.h"
#include "moe_topk.h"

namespace mssm::cpu::MSSM_LEVEL {
namespace {

// Scratch reused across calls (decode calls this once per MoE layer per token).
struct MoeScratch {
  std::vector<int64_t> offsets;    // [E + 1] start of each expert's rows in the grouped order
  std::vector<int64_t> position;   // [T·k] row of pair (t, slot) in the grouped order, or -1
  std::vector<int64_t> pair;       // [T·k] grouped order -> t·k + slot
  std::vector<float> gathered;     // [T·k, D] x rows in grouped order
  std::vector<float> fc1_out;      // [max rows of one expert, 2·H]
  std::vector<float> glu;          // [max rows of one expert, H]
  std::vector<float> expert_out;   // [T·k, D] fc2 outputs in grouped order
};

MoeScratch& moe_scratch() {
  static thread_local MoeScratch scratch;
  return scratch;
}

inline float activate(float a, Activation activation) {
  switch (activation) {
    case Activation::silu:
      return a / (1.0f + std::exp(-a));
    case Activation::gelu:  // exact: 0.5·a·(1 + erf(a/√2))
      return 0.5f * a * (1.0f + std::erf(a * 0.70710678118654752f));
    case Activation::gelu_tanh:  // 0.5·a·(1 + tanh(√(2/π)·(a + 0.044715·a³)))
      return 0.5f * a * (1.0f + std::tanh(0.79788456080286536f * (a + 0.044715f * a * a * a)));
  }
  return a;
}

}  // namespace

void moe_route(const float* logits, int64_t tokens, int64_t experts, int64_t top_k, MoeScoring scoring,
               bool renormalize, float* weights, int32_t* indices, int32_t* counts) {
  const int64_t k = std::min(top_k, experts);
  if (tokens <= 0 || experts <= 0 || top_k <= 0) {
    if (counts && experts > 0) std::memset(counts, 0, (size_t)experts * sizeof(int32_t));
    return;
  }
  // Each token's work is O(E·k); keep tiny batches on the calling thread.
  const int64_t min_chunk = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, experts * (k + 1)));
  parallel_for(tokens, min_chunk, [&](int64_t begin, int64_t end) {
    std::vector<float> scores((size_t)experts);
    for (int64_t t = begin; t < end; ++t) {
      const float* row = logits + t * experts;
      if (scoring == MoeScoring::softmax) {
        float m = row[0];
        for (int64_t e = 1; e < experts; ++e) m = row[e] > m ? row[e] : m;
        float sum = 0.0f;
        for (int64_t e = 0; e < experts; ++e) {
          scores[e] = std::exp(row[e] - m);
          sum += scores[e];
        }
        const float inv = 1.0f / sum;
        for (int64_t e = 0; e < experts; ++e) scores[e] *= inv;
      } else {
        for (int64_t e = 0; e < experts; ++e) scores[e] = 1.0f / (1.0f + std::exp(-row[e]));
      }
      TopK<float> top{weights + t * top_k, indices + t * top_k, k};
      for (int64_t e = 0; e < experts; ++e) top.insert(scores[e], (int32_t)e);
      top.finish(top_k, renormalize);
    }
  });
  if (counts) {
    std::memset(counts, 0, (size_t)experts * sizeof(int32_t));
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t j = 0; j < k; ++j) ++counts[indices[t * top_k + j]];
  }
}

void moe_experts(const MoeExpertsArgs& args) {
  const int64_t T = args.tokens, D = args.dim, H = args.hidden, E = args.experts, k = args.top_k;
  if (T <= 0 || D <= 0) return;
  const int64_t pairs = T * k;
  MoeScratch& s = moe_scratch();

  // Group (t, slot) pairs by expert with a counting sort in (t, slot) order, so the grouping and
  // every later sum are independent of the thread count. Indices outside [0, E) contribute nothing.
  s.offsets.assign((size_t)E + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) {
    const int32_t e = args.indices[p];
    if (e >= 0 && e < E) ++s.offsets[(size_t)e + 1];
  }
  int64_t max_rows = 0;
  for (int64_t e = 0; e < E; ++e) {
    max_rows = std::max(max_rows, s.offsets[e + 1]);
    s.offsets[e + 1] += s.offsets[e];
  }
  const int64_t rows = s.offsets[E];
  s.position.resize((size_t)pairs);
  s.pair.resize((size_t)std::max<int64_t>(rows, 1));
  {
    std::vector<int64_t> next(s.offsets.begin(), s.offsets.end() - 1);
    for (int64_t p = 0; p < pairs; ++p) {
      const int32_t e = args.indices[p];
      if (e >= 0 && e < E) {
        s.position[p] = next[e];
        s.pair[next[e]++] = p;
      } else {
        s.position[p] = -1;
      }
    }
  }

  s.gathered.resize((size_t)(rows * D));
  s.expert_out.resize((size_t)(rows * D));
  s.fc1_out.resize((size_t)(max_rows * 2 * H));
  s.glu.resize((size_t)(max_rows * H));
  float* gathered = s.gathered.data();
  float* expert_out = s.expert_out.data();
  float* fc1_out = s.fc1_out.data();
  float* glu = s.glu.data();
  const int64_t* pair = s.pair.data();

  const int64_t copy_chunk = std::max<int64_t>(1, 16384 / D);
  parallel_for(rows, copy_chunk, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      std::memcpy(gathered + r * D, args.x + (pair[r] / k) * D, (size_t)D * sizeof(float));
  });

  const int64_t fc1_bytes = dtype_bytes(args.fc1_dtype, 2 * H * D);
  const int64_t fc2_bytes = dtype_bytes(args.fc2_dtype, D * H);
  const Activation activation = args.activation;
  // Experts one after another; matmul spreads each over the pool (its weights are the big read).
  for (int64_t e = 0; e < E; ++e) {
    const int64_t first = s.offsets[e], count = s.offsets[e + 1] - first;
    if (count == 0) continue;
    const void* fc1 = static_cast<const char*>(args.fc1) + e * fc1_bytes;
    const void* fc2 = static_cast<const char*>(args.fc2) + e * fc2_bytes;
    matmul(gathered + first * D, fc1, args.fc1_dtype, args.fc1_bias ? args.fc1_bias + e * 2 * H : nullptr, fc1_out,
           count, 2 * H, D);
    const int64_t glu_chunk = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, H));
    parallel_for(count, glu_chunk, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* a = fc1_out + r * 2 * H;
        const float* b = a + H;
        float* g = glu + r * H;
        for (int64_t i = 0; i < H; ++i) g[i] = activate(a[i], activation) * b[i];
      }
    });
    matmul(glu, fc2, args.fc2_dtype, args.fc2_bias ? args.fc2_bias + e * D : nullptr, expert_out + first * D, count,
           D, H);
  }

  // Combine per token in slot order: the same sums in the same order at any thread count.
  const int64_t combine_chunk = std::max<int64_t>(1, 16384 / (D * std::max<int64_t>(1, k)));
  parallel_for(T, combine_chunk, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* o = args.out + t * D;
      std::memset(o, 0, (size_t)D * sizeof(float));
      for (int64_t slot = 0; slot < k; ++slot) {
        const int64_t r = s.position[t * k + slot];
        if (r < 0) continue;
        const float w = args.weights[t * k + slot];
        const float* y = expert_out + r * D;
        for (int64_t i = 0; i < D; ++i) o[i] += w * y[i];
      }
    }
  });
}

}  // namespace mssm::cpu::MSSM_LEVEL
