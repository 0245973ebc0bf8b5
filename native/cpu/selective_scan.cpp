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
// The state of a tile of state indices stays in registers for a whole run of tokens. The per-token
// quantities (Δ', Δ'·u, the partial y) are staged per run of kRun tokens in a per-thread buffer, for
// a group of neighbouring channel blocks at once so that the inputs and y are read and written as
// contiguous rows. Work is split over batch × group × channel blocks.
//
// The cost is one exp(Δ'·A) per (token, channel, state index), computed for token t + 1 while the
// recurrence of token t runs. On AVX-512 it is a table-driven 2^x (simd::Exp2) that leaves the
// multiply-add pipes, which bound the loop, about half of the general exp's work.
#include "level.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../core/threadpool.h"
#include "simd.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace mssm::cpu::MSSM_LEVEL {
namespace {

using namespace simd;

// max/min return their second operand when either is NaN: vmin(hi, vmax(lo, x)) keeps a NaN x.
#if defined(__AVX512F__)
inline vec vabs(vec v) { return _mm512_abs_ps(v); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
// a > b ? x : y per lane
inline vec vselect_greater(vec a, vec b, vec x, vec y) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), y, x);
}
#elif defined(__AVX2__) && defined(__FMA__)
inline vec vabs(vec v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
inline vec vselect_greater(vec a, vec b, vec x, vec y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
#else
inline vec vmax(vec a, vec b) { return a > b ? a : b; }
inline vec vmin(vec a, vec b) { return a < b ? a : b; }
#endif

#if defined(__AVX512F__)
// The recurrence keeps A as A·log2 e, so that its decay exp(Δ'·A) is 2^(Δ'·A·log2 e). Rounding A·log2 e
// and the product Δ'·(A·log2 e) adds a relative error of about 1.2e-7·|Δ'·A| to the decay (where
// simd.h's exp, with its two-part ln 2, stays at 1 ulp): it only grows where the decay itself is
// small, and in absolute terms stays below 5e-8 (x·e^-x ≤ 1/e), the scale at which the fp32
// update of the state rounds anyway.
constexpr float kAScale = 1.44269504088896341f;
struct DecayExp {
  Exp2 exp2;
  vec operator()(vec v) const { return exp2(v); }
};
#else
constexpr float kAScale = 1.0f;  // A is kept as is
struct DecayExp {
  vec operator()(vec v) const { return vexp(v); }
};
#endif
// Δ'·A·kAScale stays finite when both factors lie within ±kFinite: Δ' for the decay and the scaled A
// are clamped to it when staged (beyond it every decay is 0 or ∞ anyway).
constexpr float kFinite = 1e19f;

// The elementwise steps before and after the recurrence, on U vectors at a time in lockstep: each is
// a long dependent chain (an exp, a division, a series), and interleaving independent chains is what
// keeps the pipes busy.
#if defined(__AVX512F__)
// 1 / d for d ≥ 1: the 14-bit estimate and one Newton step (relative error below 1e-8), pipelined
// where a division is not.
inline vec vrecip(vec d) {
  const vec r = _mm512_rcp14_ps(d);
  return vfma(r, vfma(vmul(d, r), vset(-1.0f), vset(1.0f)), r);
}
#else
inline vec vrecip(vec d) { return vdiv(vset(1.0f), d); }
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// softplus(v) = max(v, 0) + log1p(e), e = exp(-|v|) ∈ (0, 1]. log1p(e) = 2·atanh(s) = 2s·(1 + x·g(x))
// with s = e / (2 + e) ≤ 1/3 and x = s² ≤ 1/9, g a minimax quartic of (atanh(s)/s - 1)/x (relative
// error of the result < 3e-10); for tiny e the result is ≈ e with full relative accuracy (no 1 + e
// rounding).
template <int U>
inline void vsoftplus(vec* v) {
  vec e[U], s[U], x[U], g[U];
  for (int u = 0; u < U; ++u) e[u] = vexp(vmul(vabs(v[u]), vset(-1.0f)));
  for (int u = 0; u < U; ++u) s[u] = vmul(e[u], vrecip(vadd(vset(2.0f), e[u])));
  for (int u = 0; u < U; ++u) x[u] = vmul(s[u], s[u]);
  for (int u = 0; u < U; ++u) g[u] = vfma(vset(0.1220460832f), x[u], vset(0.1070559844f));
  for (const float c : {0.1430843920f, 0.1999947727f, 0.3333333731f})
    for (int u = 0; u < U; ++u) g[u] = vfma(g[u], x[u], vset(c));
  for (int u = 0; u < U; ++u) {
    const vec log1p = vmul(vadd(s[u], s[u]), vfma(x[u], g[u], vset(1.0f)));
    v[u] = vselect_greater(v[u], vset(20.0f), v[u], vadd(log1p, vmax(v[u], vset(0.0f))));
  }
}
#else
template <int U>
inline void vsoftplus(vec* v) {
  for (int u = 0; u < U; ++u) v[u] = v[u] > 20.0f ? v[u] : std::log1p(std::exp(v[u]));
}
#endif

// v ·= silu(z) = z / (1 + exp(-z)), with z raised to -88 first: below that exp(-z) overflows to ∞,
// and the reciprocal's Newton step would turn 1/∞ into NaN (∞·0). silu(-88) is -5e-37, so the gate
// of any z ≤ -88 is that tiny value instead of the true one, nearer 0.
template <int U>
inline void vgate(vec* v, const vec* z) {
  vec zc[U], e[U];
  for (int u = 0; u < U; ++u) zc[u] = vmax(z[u], vset(-88.0f));
  for (int u = 0; u < U; ++u) e[u] = vexp(vmul(zc[u], vset(-1.0f)));
  for (int u = 0; u < U; ++u) v[u] = vmul(v[u], vmul(zc[u], vrecip(vadd(vset(1.0f), e[u]))));
}

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
constexpr int64_t kRun = 64;
constexpr int kTile = 8;
// Floats between the staged arrays: arrays a multiple of 4 KiB apart make a load and an unrelated
// store in flight look alike to the memory pipeline (4K aliasing).
constexpr int64_t kPad = 32;

// One block's staged per-token vectors: token t at delta[t·stride] and so on.
struct Staged {
  const float* delta;
  const float* delta_u;
  float* y_partial;
  int64_t stride;
};

// The recurrence for `tile` state indices over `steps` tokens of a block's staged vectors. B and C
// point at state index n0 of the first token, `stride` floats apart per token; A and state are
// [tile][kWidth] (the tile's rows of the transposed A, scaled by kAScale, and of the state). The
// decays of token t + 1 are computed while the recurrence of token t runs: they do not depend on it,
// and the long exp chains then overlap the short dependent one.
template <int tile>
void scan_tile(int64_t steps, const Staged& in, const float* B, const float* C, int64_t stride, const float* A,
               float* state) {
  const DecayExp decay;
  vec a[tile], s[tile], E[tile];
  for (int i = 0; i < tile; ++i) {
    a[i] = vload(A + i * kWidth);
    s[i] = vload(state + i * kWidth);
  }
  {
    const vec dt = vload(in.delta);
    for (int i = 0; i < tile; ++i) E[i] = decay(vmul(dt, a[i]));
  }
  // Token t; with next, also the decays of token t + 1.
  auto token = [&](int64_t t, auto next) {
    const vec dtu = vload(in.delta_u + t * in.stride);
    const float* Bt = B + t * stride;
    const float* Ct = C + t * stride;
    // Two partial sums of Σ s·C halve the dependent chain of multiply-adds per token.
    vec acc0 = vload(in.y_partial + t * in.stride), acc1 = vset(0.0f);
    const vec dt_next = decltype(next)::value ? vload(in.delta + (t + 1) * in.stride) : vset(0.0f);
    for (int i = 0; i < tile; ++i) {
      s[i] = vfma(E[i], s[i], vmul(dtu, vset(Bt[i])));
      if (i % 2 == 0)
        acc0 = vfma(s[i], vset(Ct[i]), acc0);
      else
        acc1 = vfma(s[i], vset(Ct[i]), acc1);
      if (decltype(next)::value) E[i] = decay(vmul(dt_next, a[i]));
    }
    vstore(in.y_partial + t * in.stride, vadd(acc0, acc1));
  };
  for (int64_t t = 0; t + 1 < steps; ++t) token(t, std::true_type());
  token(steps - 1, std::false_type());
  for (int i = 0; i < tile; ++i) vstore(state + i * kWidth, s[i]);
}

// The last tile, of `rest` < kTile state indices.
template <int tile>
void scan_tail(int rest, int64_t steps, const Staged& in, const float* B, const float* C, int64_t stride,
               const float* A, float* state) {
  if constexpr (tile > 0) {
    if (rest == tile) return scan_tile<tile>(steps, in, B, C, stride, A, state);
    scan_tail<tile - 1>(rest, steps, in, B, C, stride, A, state);
  }
}

// Channel blocks [first, first + count) of group g in batch b (block k: the kWidth channels from
// g·per_group + k·kWidth; the last block of a group may be partial). The blocks are staged together,
// token by token, so that Δ, u, z and y are read and written as rows of count·kWidth contiguous
// channels: one block alone would step D floats (several KiB) per token, a new page each time, which
// the hardware prefetchers do not follow.
void scan_blocks(const SelectiveScanArgs& args, int64_t b, int64_t g, int64_t first, int64_t count,
                 std::vector<float>& scratch) {
  const int64_t L = args.length, D = args.channels, N = args.state, G = args.groups;
  const int64_t per_group = D / G;
  const int64_t d_first = g * per_group + first * kWidth;
  const int64_t width = std::min(count * kWidth, per_group - first * kWidth);  // channels of these blocks
  const int64_t run = std::min(kRun, L);
  const int64_t row = count * kWidth;  // floats per token in the staged arrays
  const int64_t staged = run * row + kPad;
  const size_t floats = (size_t)(count * 2 * N * kWidth + 3 * staged + 16);
  if (scratch.size() < floats) scratch.resize(floats);  // only grows: no refill from call to call
  // Per block k: A [N][kWidth] (A[d, n]·kAScale at [n][d - d0]) and state [N][kWidth]. Then for the
  // run, token-major over the blocks (token t, block k at [t][k][lane]), so that staging reads and
  // writes whole rows: delta Δ' (clamped to ±kFinite), delta_u Δ'·u, y_partial D·u + Σ s·C. From a
  // 64-byte boundary, so that no vector straddles two cache lines.
  float* const base = scratch.data() + (-(uintptr_t)scratch.data() / sizeof(float) & 15);
  auto A_of = [&](int64_t k) { return base + k * 2 * N * kWidth; };
  auto state_of = [&](int64_t k) { return A_of(k) + N * kWidth; };
  float* const delta = base + count * 2 * N * kWidth;
  float* const delta_u = delta + staged;
  float* const y_partial = delta_u + staged;
  auto lanes_of = [&](int64_t k) { return std::min(kWidth, width - k * kWidth); };
  const int64_t full = width / kWidth;  // blocks with all kWidth lanes

  // Token t of the run (in: its offset in Δ, u, z and y at the group's first channel), blocks
  // [k, k + U): Δ', Δ'·u and D·u into the scratch.
  auto stage = [&](auto unroll, int64_t in, int64_t k, int64_t t) {
    constexpr int U = decltype(unroll)::value;
    vec dt[U], u[U];
    for (int i = 0; i < U; ++i) {
      const int64_t lanes = lanes_of(k + i), c = in + (k + i) * kWidth;
      const int64_t d = d_first + (k + i) * kWidth;
      dt[i] = load_lanes(args.delta + c, lanes);
      if (args.delta_bias) dt[i] = vadd(dt[i], load_lanes(args.delta_bias + d, lanes));
      u[i] = load_lanes(args.u + c, lanes);
    }
    if (args.delta_softplus) vsoftplus<U>(dt);
    for (int i = 0; i < U; ++i) {
      const int64_t d = d_first + (k + i) * kWidth;
      const int64_t at = t * row + (k + i) * kWidth;
      vstore(delta + at, vmin(vset(kFinite), vmax(vset(-kFinite), dt[i])));
      vstore(delta_u + at, vmul(dt[i], u[i]));
      // D ⊙ u first; Σ s·C accumulates onto it
      vstore(y_partial + at, args.D ? vmul(load_lanes(args.D + d, lanes_of(k + i)), u[i]) : vset(0.0f));
    }
  };
  // y = (D·u + Σ s·C) · silu(z) out of the scratch, for the same token and blocks.
  auto finish = [&](auto unroll, int64_t out, int64_t k, int64_t t) {
    constexpr int U = decltype(unroll)::value;
    vec y[U];
    for (int i = 0; i < U; ++i) y[i] = vload(y_partial + t * row + (k + i) * kWidth);
    if (args.z) {
      vec z[U];
      for (int i = 0; i < U; ++i) z[i] = load_lanes(args.z + out + (k + i) * kWidth, lanes_of(k + i));
      vgate<U>(y, z);
    }
    for (int i = 0; i < U; ++i) store_lanes(args.y + out + (k + i) * kWidth, y[i], lanes_of(k + i));
  };

  // Padding lanes get A = 0, state = 0 and u = 0: their state stays 0 and they are never stored.
  for (int64_t k = 0; k < count; ++k) {
    float* A = A_of(k);
    float* state = state_of(k);
    const int64_t d0 = d_first + k * kWidth;
    if (lanes_of(k) < kWidth) std::fill(A, A + 2 * N * kWidth, 0.0f);
    transpose(args.A + d0 * N, N, lanes_of(k), N, A, kWidth);
    for (int64_t e = 0; e < N * kWidth; e += kWidth)
      vstore(A + e, vmin(vset(kFinite), vmax(vset(-kFinite), vmul(vload(A + e), vset(kAScale)))));
    if (args.state_in)
      transpose(args.state_in + (b * D + d0) * N, N, lanes_of(k), N, state, kWidth);
    else
      std::fill(state, state + N * kWidth, 0.0f);
  }
  const int64_t stride = G * N;

  for (int64_t t0 = 0; t0 < L; t0 += run) {
    const int64_t steps = std::min(run, L - t0);
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t in = (b * L + t0 + t) * D + d_first;
      int64_t k = 0;
      for (; k + 2 <= full; k += 2) stage(std::integral_constant<int, 2>(), in, k, t);
      for (; k < count; ++k) stage(std::integral_constant<int, 1>(), in, k, t);
    }
    const float* B = args.B + ((b * L + t0) * G + g) * N;
    const float* C = args.C + ((b * L + t0) * G + g) * N;
    for (int64_t k = 0; k < count; ++k) {
      const float* A = A_of(k);
      float* state = state_of(k);
      const Staged in{delta + k * kWidth, delta_u + k * kWidth, y_partial + k * kWidth, row};
      int64_t n0 = 0;
      for (; n0 + kTile <= N; n0 += kTile)
        scan_tile<kTile>(steps, in, B + n0, C + n0, stride, A + n0 * kWidth, state + n0 * kWidth);
      scan_tail<kTile - 1>((int)(N - n0), steps, in, B + n0, C + n0, stride, A + n0 * kWidth,
                           state + n0 * kWidth);
    }
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t out = (b * L + t0 + t) * D + d_first;
      int64_t k = 0;
      for (; k + 4 <= full; k += 4) finish(std::integral_constant<int, 4>(), out, k, t);
      for (; k < count; ++k) finish(std::integral_constant<int, 1>(), out, k, t);
    }
  }

  // Written after these blocks' state_in was read, and threads own disjoint channels: state_out may
  // alias state_in.
  if (args.state_out)
    for (int64_t k = 0; k < count; ++k)
      transpose(state_of(k), kWidth, N, lanes_of(k), args.state_out + (b * D + d_first + k * kWidth) * N, N);
}

// Blocks staged together: bounded so that their scratch stays well inside L2.
constexpr int64_t kScratchFloats = 96 * 1024;

void scan(const SelectiveScanArgs& args) {
  const int64_t per_group = args.channels / args.groups;
  const int64_t blocks = (per_group + kWidth - 1) / kWidth;  // channel blocks per group
  const int64_t tasks = args.batch * args.groups * blocks;
  const int64_t work_per_task = std::max<int64_t>(1, args.length * kWidth * args.state);
  const int64_t block_floats = (2 * args.state + 3 * std::min(kRun, args.length)) * kWidth;
  const int64_t together = std::max<int64_t>(1, kScratchFloats / block_floats);
  parallel_for(tasks, std::max<int64_t>(1, 4096 / work_per_task), [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;
    // [begin, end) in (batch, group, block) order: runs of consecutive blocks of one (b, g).
    for (int64_t task = begin; task < end;) {
      const int64_t block = task % blocks, g = (task / blocks) % args.groups, b = task / (blocks * args.groups);
      const int64_t count = std::min({together, blocks - block, end - task});
      scan_blocks(args, b, g, block, count, scratch);
      task += count;
    }
  });
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// The decode update (length 1) when N is whole vectors: a channel's state row [N] then is whole
// vectors in the caller's [channels][N] layout and is updated where it lies, where the general path
// transposes A and the state in and out of its channel-lane layout for every token (three quarters of
// its decode time). Δ', Δ'·u, D·u and the gate run across kWidth channels at once; y's sum over n is
// one horizontal sum per channel. Channels [d_begin, d_end) of sequence b.
void state_update_rows(const SelectiveScanArgs& args, int64_t b, int64_t d_begin, int64_t d_end) {
  const int64_t D = args.channels, N = args.state, G = args.groups, per_group = D / G;
  const DecayExp decay;
  for (int64_t d0 = d_begin; d0 < d_end; d0 += kWidth) {
    const int64_t lanes = std::min(kWidth, d_end - d0), at = b * D + d0;
    vec dt = load_lanes(args.delta + at, lanes);
    if (args.delta_bias) dt = vadd(dt, load_lanes(args.delta_bias + d0, lanes));
    if (args.delta_softplus) vsoftplus<1>(&dt);
    const vec u = load_lanes(args.u + at, lanes);
    float dts[kWidth], dtus[kWidth], ys[kWidth] = {};
    vstore(dts, vmin(vset(kFinite), vmax(vset(-kFinite), dt)));
    vstore(dtus, vmul(dt, u));
    for (int64_t j = 0; j < lanes; ++j) {
      const int64_t d = d0 + j, bg = (b * G + d / per_group) * N;
      const float* A = args.A + d * N;
      const float* s_in = args.state_in ? args.state_in + (b * D + d) * N : nullptr;
      float* s_out = args.state_out + (b * D + d) * N;
      const vec dtv = vset(dts[j]), dtuv = vset(dtus[j]);
      vec acc = vzero();
      for (int64_t n = 0; n < N; n += kWidth) {
        const vec a = vmin(vset(kFinite), vmax(vset(-kFinite), vmul(vload(A + n), vset(kAScale))));
        const vec s = vfma(decay(vmul(dtv, a)), s_in ? vload(s_in + n) : vzero(), vmul(dtuv, vload(args.B + bg + n)));
        vstore(s_out + n, s);
        acc = vfma(s, vload(args.C + bg + n), acc);
      }
      ys[j] = vsum(acc);
    }
    vec y = vload(ys);
    if (args.D) y = vfma(load_lanes(args.D + d0, lanes), u, y);
    if (args.z) {
      const vec z = load_lanes(args.z + at, lanes);
      vgate<1>(&y, &z);
    }
    store_lanes(args.y + at, y, lanes);
  }
}
#endif

}  // namespace

void selective_scan(const SelectiveScanArgs& args) { scan(args); }

void selective_state_update(const SelectiveScanArgs& args) {
  if (args.length != 1 || !args.state_out) {
    std::fprintf(stderr, "mamba-ssm: selective_state_update needs length 1 and state_out (got length %lld%s)\n",
                 (long long)args.length, args.state_out ? "" : ", no state_out");
    std::abort();
  }
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  if (args.state % kWidth == 0) {
    const int64_t blocks = (args.channels + kWidth - 1) / kWidth;
    parallel_for(args.batch * blocks, std::max<int64_t>(1, 4096 / (kWidth * args.state)), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, d0 = task % blocks * kWidth;
        state_update_rows(args, b, d0, std::min(args.channels, d0 + kWidth));
      }
    });
    return;
  }
#endif
  scan(args);
}

}  // namespace mssm::cpu::MSSM_LEVEL
