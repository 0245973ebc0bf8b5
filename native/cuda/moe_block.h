// The mixture-of-experts kernels of moe.cu as code on native/cuda/block.h's primitives, so that they
// also compile without nvcc: a CPU test runs them, the grouping on emulated blocks, against a counting
// sort and the whole block against the CPU kernel (native/tests/test_moe_blocks.cpp). The per-thread
// kernels are one function of their thread's index each; moe.cu's kernels loop over them.
//
// The grouping: block e walks the tokens in order, kGroupThreads at a time, and ranks the pairs routed to e with a
// block-wide exclusive scan of each token's count of them. Count pass (place = false): offsets[e + 1]
// = the count. Place pass, once offsets holds the running sums: pair[offsets[e] + rank] = p and
// position[p] = offsets[e] + rank. So each expert's pairs keep the (token, slot) order, whatever the
// launch shape.
#pragma once
#include <cmath>
#include <cstdint>

#include "block.h"
#include "cpu/kernels.h"
#include "scalar.h"
#include "cpu/moe_topk.h"

namespace mssm::cuda::moe {

constexpr int kGroupThreads = 256;

MSSM_BLOCK_FN void group_block(const int32_t* indices, int64_t tokens, int64_t top_k, int64_t* offsets, int64_t* pair,
                               int64_t* position, bool place, int e) {
  MSSM_SHARED(long long, base);
  if (MSSM_RANK == 0) base = place ? offsets[e] : 0;
  MSSM_SYNC();
  for (int64_t t0 = 0; t0 < tokens; t0 += kGroupThreads) {
    const int64_t t = t0 + MSSM_RANK;
    long long c = 0;
    if (t < tokens)
      for (int64_t slot = 0; slot < top_k; ++slot) c += indices[t * top_k + slot] == e;
    long long round_total;
    const long long first = base + block::inclusive_sum<long long, kGroupThreads>(c, &round_total) - c;
    if (place && c > 0) {
      long long r = first;
      for (int64_t slot = 0; slot < top_k; ++slot) {
        const int64_t p = t * top_k + slot;
        if (indices[p] == e) {
          pair[r] = p;
          position[p] = r;
          ++r;
        }
      }
    }
    MSSM_SYNC();
    if (MSSM_RANK == kGroupThreads - 1) base = first + c;
    MSSM_SYNC();
  }
  if (!place && MSSM_RANK == 0) offsets[e + 1] = base;
}

// The rows the experts' products are sized for (their grids, and the skinny or the tiled kernel): the
// rows one expert gets when each token sends it at most one pair (the router's choice), plus the
// zero-weight slots past E (top_k > E), which all go to expert 0. Any other distribution is still
// done in full (the kernels loop over rows).
inline int64_t max_rows(int64_t tokens, int64_t top_k, int64_t experts) {
  return top_k > experts ? tokens * (top_k - experts + 1) : tokens;
}

// Token t of the router: scores (softmax or sigmoid) in the CPU router's form, then its choice of the
// top k (cpu/moe_topk.h).
MSSM_BLOCK_FN void route_token(const float* logits, int64_t experts, int64_t top_k, bool softmax, bool renormalize,
                               float* weights, int32_t* indices, int64_t t) {
  const float* row = logits + t * experts;
  const int64_t k = scalar::min64(top_k, experts);
  float m = 0.0f, inv = 1.0f;
  if (softmax) {
    m = row[0];
    for (int64_t e = 1; e < experts; ++e) m = row[e] > m ? row[e] : m;
    float sum = 0.0f;
    for (int64_t e = 0; e < experts; ++e) sum += expf(row[e] - m);
    inv = 1.0f / sum;
  }
  cpu::TopK<float> top{weights + t * top_k, indices + t * top_k, k};
  for (int64_t e = 0; e < experts; ++e)
    top.insert(softmax ? expf(row[e] - m) * inv : 1.0f / (1.0f + expf(-row[e])), (int32_t)e);
  top.finish(top_k, renormalize);
}

// Element i of the gathered activations [max_rows, dim]: gathered[r] = x[token of pair[r]] for the
// rows that exist (r < rows = offsets[E], read once by the caller).
MSSM_BLOCK_FN void gather_element(const float* x, const int64_t* pair, int64_t rows, int64_t top_k, int64_t dim,
                                  float* gathered, int64_t i) {
  const int64_t r = i / dim;
  if (r < rows) gathered[i] = x[(pair[r] / top_k) * dim + i % dim];
}

// The CPU kernel's activations (moe.cpp: silu; exact gelu; gelu with the tanh approximation).
MSSM_BLOCK_FN float activate(float a, cpu::Activation activation) {
  switch (activation) {
    case cpu::Activation::silu:
      return scalar::silu(a);
    case cpu::Activation::gelu:
      return 0.5f * a * (1.0f + erff(a * 0.70710678118654752f));
    case cpu::Activation::gelu_tanh:
      return 0.5f * a * (1.0f + tanhf(0.79788456080286536f * (a + 0.044715f * a * a * a)));
  }
  return a;
}

// Element i of glu [max_rows, hidden]: act(h[r, j]) · h[r, H + j] for h = fc1_out [rows, 2H] (rows =
// offsets[E], read once by the caller).
MSSM_BLOCK_FN void glu_element(const float* h, int64_t rows, int64_t hidden, cpu::Activation activation, float* glu,
                               int64_t i) {
  const int64_t r = i / hidden, j = i % hidden;
  if (r < rows) glu[i] = activate(h[r * 2 * hidden + j], activation) * h[r * 2 * hidden + hidden + j];
}

// Element i of out [tokens, dim]: Σ_slot weights[t, slot] · expert_out[position[t, slot]], in slot
// order, from zero.
MSSM_BLOCK_FN void combine_element(const float* expert_out, const int64_t* position, const float* weights,
                                   int64_t top_k, int64_t dim, float* out, int64_t i) {
  const int64_t t = i / dim, j = i % dim;
  float o = 0.0f;
  for (int64_t slot = 0; slot < top_k; ++slot) {
    const int64_t r = position[t * top_k + slot];
    if (r >= 0) o += weights[t * top_k + slot] * expert_out[r * dim + j];
  }
  out[i] = o;
}

}  // namespace mssm::cuda::moe
