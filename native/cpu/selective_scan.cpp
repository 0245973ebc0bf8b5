// The Mamba-1 selective scan (S6): the sequence form and the one-token decode update.
//
// Glossary: b batch, t token (L = length), d channel (D = channels = d_inner), n state index
// (N = state), g group of B/C (G = groups), Δ = delta. Per channel d of group g = d / (D/G):
//   Δ'_t = softplus(Δ_t + delta_bias)         (when delta_softplus; softplus(v) = v for v > 20)
//   s_t[n] = exp(Δ'_t · A[d,n]) · s_{t-1}[n] + Δ'_t · u_t · B_t[g,n]
//   y_t = Σ_n s_t[n] · C_t[g,n] + D[d] · u_t ;  y_t *= silu(z_t) when z is given
//
// Vectorised across channels: one vector holds kWidth channels of one group, so B_t and C_t are
// broadcasts and no horizontal sums are needed; any N works and no lane is wasted when N is small.
// The state of a tile of state indices stays in registers for a whole run of tokens; the per-token
// quantities (Δ', Δ'·u, the partial y) are staged per run of kRun tokens in a small per-thread buffer
// in [token][lane] layout. Work is split over batch × group × channel blocks.
#include "level.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
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

#if defined(__AVX512F__)
inline vec vabs(vec v) { return _mm512_abs_ps(v); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
// a > b ? x : y per lane
inline vec vselect_greater(vec a, vec b, vec x, vec y) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), y, x);
}
#elif defined(__AVX2__) && defined(__FMA__)
inline vec vabs(vec v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vselect_greater(vec a, vec b, vec x, vec y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
#endif


#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// softplus(v) = max(v, 0) + log1p(e), e = exp(-|v|) ∈ (0, 1]. log1p(e) = 2·atanh(s) with
// s = e / (2 + e) ≤ 1/3, summed as the series 2·Σ s^(2i+1)/(2i+1): eight terms leave < 2e-9
// relative, and for tiny e the result is ≈ e with full relative accuracy (no 1 + e rounding).
inline vec vsoftplus(vec v) {
  vec e = vexp(vmul(vabs(v), vset(-1.0f)));
  vec s = vdiv(e, vadd(vset(2.0f), e));
  vec s2 = vmul(s, s);
  vec series = vset(1.0f / 15.0f);
  series = vfma(series, s2, vset(1.0f / 13.0f));
  series = vfma(series, s2, vset(1.0f / 11.0f));
  series = vfma(series, s2, vset(1.0f / 9.0f));
  series = vfma(series, s2, vset(1.0f / 7.0f));
  series = vfma(series, s2, vset(1.0f / 5.0f));
  series = vfma(series, s2, vset(1.0f / 3.0f));
  series = vfma(series, s2, vset(1.0f));
  vec result = vfma(vadd(s, s), series, vmax(v, vset(0.0f)));
  return vselect_greater(v, vset(20.0f), v, result);
}
#else
inline vec vsoftplus(vec v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }
#endif

// Loads/stores `lanes` ≤ kWidth floats; missing lanes read as 0.
inline vec load_lanes(const float* p, int64_t lanes) {
  if (lanes == kWidth) return vload(p);
  float padded[kWidth] = {};
  std::memcpy(padded, p, lanes * sizeof(float));
  return vload(padded);
}
inline void store_lanes(float* p, vec v, int64_t lanes) {
  if (lanes == kWidth) return vstore(p, v);
  float padded[kWidth];
  vstore(padded, v);
  std::memcpy(p, padded, lanes * sizeof(float));
}

// Tokens staged per run; state indices kept in registers per pass over a run.
constexpr int64_t kRun = 128;
constexpr int kTile = 8;

// The recurrence for `tile` state indices over `steps` tokens. delta, delta_u and y_partial are
// [steps][kWidth]; B and C point at state index n0 of the first token, `stride` floats apart per
// token; A and state are [tile][kWidth] (the tile's rows of the transposed A and state).
template <int tile>
void scan_tile(int64_t steps, const float* delta, const float* delta_u, float* y_partial, const float* B,
               const float* C, int64_t stride, const float* A, float* state) {
  vec a[tile], s[tile];
  for (int i = 0; i < tile; ++i) {
    a[i] = vload(A + i * kWidth);
    s[i] = vload(state + i * kWidth);
  }
  for (int64_t t = 0; t < steps; ++t) {
    const vec dt = vload(delta + t * kWidth), dtu = vload(delta_u + t * kWidth);
    const float* Bt = B + t * stride;
    const float* Ct = C + t * stride;
    vec acc = vload(y_partial + t * kWidth);
    for (int i = 0; i < tile; ++i) {
      s[i] = vfma(vexp(vmul(dt, a[i])), s[i], vmul(dtu, vset(Bt[i])));
      acc = vfma(s[i], vset(Ct[i]), acc);
    }
    vstore(y_partial + t * kWidth, acc);
  }
  for (int i = 0; i < tile; ++i) vstore(state + i * kWidth, s[i]);
}

// The last tile, of `rest` < kTile state indices.
template <int tile>
void scan_tail(int rest, int64_t steps, const float* delta, const float* delta_u, float* y_partial, const float* B,
               const float* C, int64_t stride, const float* A, float* state) {
  if constexpr (tile > 0) {
    if (rest == tile) return scan_tile<tile>(steps, delta, delta_u, y_partial, B, C, stride, A, state);
    scan_tail<tile - 1>(rest, steps, delta, delta_u, y_partial, B, C, stride, A, state);
  }
}

// One channel block: channels [d0, d0 + lanes) of batch b, all in group g.
void scan_block(const SelectiveScanArgs& args, int64_t b, int64_t g, int64_t d0, int64_t lanes,
                std::vector<float>& scratch) {
  const int64_t L = args.length, D = args.channels, N = args.state, G = args.groups;
  scratch.resize((2 * N + 3 * kRun) * kWidth);
  float* A = scratch.data();             // [N][kWidth]  A[d0 + j, n] at [n][j]
  float* state = A + N * kWidth;         // [N][kWidth]
  float* delta = state + N * kWidth;     // [kRun][kWidth]  Δ'
  float* delta_u = delta + kRun * kWidth;  // [kRun][kWidth]  Δ'·u
  float* y_partial = delta_u + kRun * kWidth;

  // Padding lanes get A = 0, state = 0 and u = 0: their state stays 0 and they are never stored.
  std::fill(A, A + 2 * N * kWidth, 0.0f);
  for (int64_t j = 0; j < lanes; ++j) {
    const float* a_row = args.A + (d0 + j) * N;
    for (int64_t n = 0; n < N; ++n) A[n * kWidth + j] = a_row[n];
    if (args.state_in) {
      const float* s_row = args.state_in + (b * D + d0 + j) * N;
      for (int64_t n = 0; n < N; ++n) state[n * kWidth + j] = s_row[n];
    }
  }
  const vec bias = args.delta_bias ? load_lanes(args.delta_bias + d0, lanes) : vset(0.0f);
  const vec skip = args.D ? load_lanes(args.D + d0, lanes) : vset(0.0f);
  const int64_t stride = G * N;

  for (int64_t t0 = 0; t0 < L; t0 += kRun) {
    const int64_t steps = std::min(kRun, L - t0);
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t row = (b * L + t0 + t) * D + d0;
      vec dt = vadd(load_lanes(args.delta + row, lanes), bias);
      if (args.delta_softplus) dt = vsoftplus(dt);
      const vec u = load_lanes(args.u + row, lanes);
      vstore(delta + t * kWidth, dt);
      vstore(delta_u + t * kWidth, vmul(dt, u));
      vstore(y_partial + t * kWidth, vmul(skip, u));  // D ⊙ u first; Σ s·C accumulates onto it
    }
    const float* B = args.B + ((b * L + t0) * G + g) * N;
    const float* C = args.C + ((b * L + t0) * G + g) * N;
    int64_t n0 = 0;
    for (; n0 + kTile <= N; n0 += kTile)
      scan_tile<kTile>(steps, delta, delta_u, y_partial, B + n0, C + n0, stride, A + n0 * kWidth,
                       state + n0 * kWidth);
    scan_tail<kTile - 1>((int)(N - n0), steps, delta, delta_u, y_partial, B + n0, C + n0, stride, A + n0 * kWidth,
                         state + n0 * kWidth);
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t row = (b * L + t0 + t) * D + d0;
      vec y = vload(y_partial + t * kWidth);
      if (args.z) y = vmul(y, vsilu(load_lanes(args.z + row, lanes)));
      store_lanes(args.y + row, y, lanes);
    }
  }

  // Written after this block's state_in was read, and blocks are disjoint: state_out may alias it.
  if (args.state_out) {
    for (int64_t j = 0; j < lanes; ++j) {
      float* s_row = args.state_out + (b * D + d0 + j) * N;
      for (int64_t n = 0; n < N; ++n) s_row[n] = state[n * kWidth + j];
    }
  }
}

void scan(const SelectiveScanArgs& args) {
  const int64_t per_group = args.channels / args.groups;
  const int64_t blocks = (per_group + kWidth - 1) / kWidth;  // channel blocks per group
  const int64_t tasks = args.batch * args.groups * blocks;
  const int64_t work_per_task = std::max<int64_t>(1, args.length * kWidth * args.state);
  parallel_for(tasks, std::max<int64_t>(1, 16384 / work_per_task), [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % blocks, g = (task / blocks) % args.groups, b = task / (blocks * args.groups);
      const int64_t d0 = g * per_group + block * kWidth;
      scan_block(args, b, g, d0, std::min<int64_t>(kWidth, per_group - block * kWidth), scratch);
    }
  });
}

}  // namespace

void selective_scan(const SelectiveScanArgs& args) { scan(args); }

void selective_state_update(const SelectiveScanArgs& args) {
  if (args.length != 1 || !args.state_out) {
    std::fprintf(stderr, "mamba-ssm: selective_state_update needs length 1 and state_out (got length %lld%s)\n",
                 (long long)args.length, args.state_out ? "" : ", no state_out");
    std::abort();
  }
  scan(args);
}

}  // namespace mssm::cpu::MSSM_LEVEL
