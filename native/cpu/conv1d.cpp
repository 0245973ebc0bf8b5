// Causal depthwise conv1d over time, channels last, with SiLU fused (the Mamba block's short conv).
//
// Glossary: b batch, t token (L = length), c channel (C = channels), k tap (K = kernel).
//   xp[b] = concat(state_in[b], x[b]) over time        (K-1 + L rows)
//   y[b,t,c] = act(bias[c] + Σ_k w[c,k] · xp[b,t+k,c]),  act = SiLU or identity
//   state_out[b] = the last K-1 rows of xp[b]
// Vectorised across channels: the taps of a channel block are transposed once into [K][block] so
// each tap is one vector FMA over contiguous channels of one xp row.
#include "level.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../core/threadpool.h"
#include "simd.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace mssm::cpu::MSSM_LEVEL {
namespace {

using namespace simd;


// Channels per task of the step: a few vectors, so one task streams a few cache lines per row.
constexpr int64_t kBlock = 64;
// Channels and tokens per task of the sequence form. Its xp rows are C floats apart (6 KB in
// mamba-130m), so each row's piece starts in a new page, where the prefetchers start over: 512
// channels (2 KB a row) rather than 64 took a 512-token mamba-130m layer on two threads from 337 to
// 226 µs, which then split the work evenly (one thread: 452 µs either way).
constexpr int64_t kSeqBlock = 512;
constexpr int64_t kTokens = 64;

// U whole vectors of channels from j: conv_block's body.
template <int U>
inline void conv_vectors(const float* const* taps, const float* weights, int64_t ldw, const float* bias, float* y,
                         int64_t kernel, int64_t j, bool silu) {
  vec acc[U];
  for (int u = 0; u < U; ++u) acc[u] = bias ? vload(bias + j + u * kWidth) : vset(0.0f);
  for (int64_t k = 0; k < kernel; ++k) {
    if (!taps[k]) continue;
    for (int u = 0; u < U; ++u)
      acc[u] = vfma(vload(weights + k * ldw + j + u * kWidth), vload(taps[k] + j + u * kWidth), acc[u]);
  }
  for (int u = 0; u < U; ++u) vstore(y + j + u * kWidth, silu ? vsilu(acc[u]) : acc[u]);
}

// y for `lanes` channels (≤ ldw) of one token: taps[k] points at the channel block of xp row t+k
// (null: a zero row), weights is [K][ldw].
inline void conv_block(const float* const* taps, const float* weights, int64_t ldw, const float* bias, float* y,
                       int64_t kernel, int64_t lanes, bool silu) {
  int64_t j = 0;
  // Four vectors at a time: each one's taps and SiLU form a long dependent chain, and four independent
  // chains keep the pipes busy (a 512-token mamba-130m layer on one thread: 452 → 233 µs).
  for (; j + 4 * kWidth <= lanes; j += 4 * kWidth) conv_vectors<4>(taps, weights, ldw, bias, y, kernel, j, silu);
  for (; j + kWidth <= lanes; j += kWidth) conv_vectors<1>(taps, weights, ldw, bias, y, kernel, j, silu);
  if (j < lanes) {  // channel tail: through a padded vector
    float in[kWidth] = {}, out[kWidth];
    vec acc = vset(0.0f);
    if (bias) {
      std::memcpy(in, bias + j, (lanes - j) * sizeof(float));
      acc = vload(in);
    }
    for (int64_t k = 0; k < kernel; ++k) {
      if (!taps[k]) continue;
      std::memcpy(in, taps[k] + j, (lanes - j) * sizeof(float));
      acc = vfma(vload(weights + k * ldw + j), vload(in), acc);
    }
    vstore(out, silu ? vsilu(acc) : acc);
    std::memcpy(y + j, out, (lanes - j) * sizeof(float));
  }
}

// weights[k][j] = w[c0 + j, k], zero-padded to ldw lanes.
inline void transpose_taps(const float* w, int64_t c0, int64_t lanes, int64_t kernel, float* weights, int64_t ldw) {
  std::fill(weights, weights + kernel * ldw, 0.0f);
  for (int64_t j = 0; j < lanes; ++j)
    for (int64_t k = 0; k < kernel; ++k) weights[k * ldw + j] = w[(c0 + j) * kernel + k];
}

std::vector<float>& tap_scratch(int64_t kernel, int64_t ldw) {
  thread_local std::vector<float> scratch;
  if ((int64_t)scratch.size() < kernel * ldw) scratch.resize(kernel * ldw);
  return scratch;
}

}  // namespace

void conv1d(const float* x, const float* w, const float* bias, const float* state_in, float* state_out, float* y,
            int64_t batch, int64_t length, int64_t channels, int64_t kernel, bool silu) {
  const int64_t history = kernel - 1;  // rows of state
  const int64_t channel_blocks = (channels + kSeqBlock - 1) / kSeqBlock;
  const int64_t token_blocks = (length + kTokens - 1) / kTokens;
  const int64_t tasks = batch * token_blocks * channel_blocks;
  // xp row r of batch b: state_in row r while r < K-1, else x row r-(K-1).
  auto xp_row = [&](int64_t b, int64_t r) -> const float* {
    if (r >= history) return x + (b * length + r - history) * channels;
    return state_in ? state_in + (b * history + r) * channels : nullptr;
  };

  // y reads xp only, so tokens can be split freely; state_out (which may alias state_in) is written
  // in a second pass after every read of state_in.
  // Tasks run token blocks fastest, so that a thread's run of tasks transposes a block's taps once.
  const int64_t work_per_task = kTokens * kSeqBlock * kernel;
  parallel_for(tasks, std::max<int64_t>(1, 65536 / work_per_task), [&](int64_t begin, int64_t end) {
    float* weights = tap_scratch(kernel, kSeqBlock).data();
    std::vector<const float*> taps(kernel);
    int64_t loaded_block = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tb = task % token_blocks;
      const int64_t cb = (task / token_blocks) % channel_blocks;
      const int64_t b = task / (channel_blocks * token_blocks);
      const int64_t c0 = cb * kSeqBlock, lanes = std::min(kSeqBlock, channels - c0);
      if (cb != loaded_block) {
        transpose_taps(w, c0, lanes, kernel, weights, kSeqBlock);
        loaded_block = cb;
      }
      const int64_t t_end = std::min(length, (tb + 1) * kTokens);
      for (int64_t t = tb * kTokens; t < t_end; ++t) {
        for (int64_t k = 0; k < kernel; ++k) {
          const float* row = xp_row(b, t + k);
          taps[k] = row ? row + c0 : nullptr;
        }
        conv_block(taps.data(), weights, kSeqBlock, bias ? bias + c0 : nullptr, y + (b * length + t) * channels + c0,
                   kernel, lanes, silu);
      }
    }
  });

  if (!state_out || history == 0) return;
  // Row j of state_out is xp row L+j. When L < K-1 it comes from state_in row L+j > j, so copying in
  // increasing j is safe when state_out aliases state_in.
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < history; ++j) {
      float* dst = state_out + (b * history + j) * channels;
      const float* src = xp_row(b, length + j);
      if (!src)
        std::fill(dst, dst + channels, 0.0f);
      else if (src != dst)
        std::memmove(dst, src, channels * sizeof(float));
    }
  }
}

void conv1d_step(const float* x, const float* w, const float* bias, float* state, float* y, int64_t batch,
                 int64_t channels, int64_t kernel, bool silu) {
  const int64_t history = kernel - 1;
  const int64_t channel_blocks = (channels + kBlock - 1) / kBlock;
  // A few blocks per thread: a step of one sequence (24 blocks in mamba-130m) is split over the pool.
  // Its state and taps come from DRAM, latency-bound: two threads took a mamba-130m layer's step from
  // 4.3–4.5 to 3.1–3.3 µs in most runs (24 layers' states and taps evicted between steps).
  parallel_for(batch * channel_blocks, std::max<int64_t>(1, 2048 / (kBlock * kernel)), [&](int64_t begin, int64_t end) {
    float* weights = tap_scratch(kernel, kBlock).data();
    std::vector<const float*> taps(kernel);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t cb = task % channel_blocks, b = task / channel_blocks;
      const int64_t c0 = cb * kBlock, lanes = std::min(kBlock, channels - c0);
      transpose_taps(w, c0, lanes, kernel, weights, kBlock);
      float* rows = state + b * history * channels + c0;  // this block of the K-1 state rows
      const float* input = x + b * channels + c0;
      for (int64_t k = 0; k < history; ++k) taps[k] = rows + k * channels;
      taps[history] = input;
      conv_block(taps.data(), weights, kBlock, bias ? bias + c0 : nullptr, y + b * channels + c0, kernel, lanes, silu);
      // The window slides by one token: drop the oldest row, append x.
      for (int64_t k = 0; k + 1 < history; ++k)
        std::memcpy(rows + k * channels, rows + (k + 1) * channels, lanes * sizeof(float));
      if (history > 0) std::memcpy(rows + (history - 1) * channels, input, lanes * sizeof(float));
    }
  });
}

}  // namespace mssm::cpu::MSSM_LEVEL
