// Forward and backward of the ops a Mamba model is trained through (see ops.h for the equations).
//
// Glossary as in ops.h: b batch, t token (L), d / c channel (D), n state index (N), g group (G),
// k tap (K), r row; dyc the adjoint of the scan output before the z gate.
//
// Determinism: every parameter gradient (+=) is reduced over a partition fixed by the shapes (blocks
// of channels or columns, per-batch partials added in batch order), never by the thread count, so
// the results are bit-identical at any number of threads.
//
// Vectorisation: like the kernels of native/cpu, this file is compiled once per CPU level (baseline,
// avx2, avx512, avx512bf16) into mssm::train::<level>, and ops_dispatch.cpp calls the level in use. There
// are no reassociation flags, so sums are written over kLanes independent partial sums that the
// compiler can keep in SIMD registers; for T = float the exponential is a branch-free polynomial
// (exp_fast) for the same reason. The scan vectorises across the 16 channels of a block instead (see
// "Selective scan" below), with one AVX-512 helper for its sums over channels.
#include "../cpu/level.h"
#include "ops_table.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "../core/exp_poly.h"
#include "../core/threadpool.h"
#include "../cpu/simd.h"
#include "dt_rule.h"

namespace mssm::train::MSSM_LEVEL {
namespace {

constexpr int kLanes = 16;
// Row sums are taken in T lanes over blocks of kSumBlock values and the block sums in double.
constexpr int64_t kSumBlock = 512;
// Values per parallel task below which a loop stays on one thread.
constexpr int64_t kMinValuesPerTask = 1 << 14;
// Channels per scan task and columns per weight-gradient task: fixed, so that the partial sums of a
// parameter gradient are the same whatever the thread count.
constexpr int64_t kScanBlock = 16;
constexpr int64_t kColumnBlock = 64;

int64_t min_tasks(int64_t values_per_task) {
  return std::max<int64_t>(1, kMinValuesPerTask / std::max<int64_t>(1, values_per_task));
}

// (core/exp_poly.h: about 2 ulp, branch-free so the loops over it vectorise)
inline float exp_fast(float v) { return exp_poly(v); }
inline double exp_fast(double v) { return std::exp(v); }

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + exp_fast(-v));
}
template <typename T>
inline T silu(T v) {
  return v * sigmoid(v);
}
// d silu(v) / dv = σ(v) · (1 + v · (1 − σ(v)))
template <typename T>
inline T silu_grad(T v) {
  const T s = sigmoid(v);
  return s * (T(1) + v * (T(1) - s));
}

// Σ term(i) for i < n, in T lanes per kSumBlock values and double across blocks.
template <typename T, typename F>
inline double blocked_sum(int64_t n, F&& term) {
  double total = 0;
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t end = std::min(n, b + kSumBlock);
    T lanes[kLanes] = {};
    int64_t i = b;
    for (; i + kLanes <= end; i += kLanes)
      for (int j = 0; j < kLanes; ++j) lanes[j] += term(i + j);
    for (; i < end; ++i) lanes[0] += term(i);
    T block = 0;
    for (int j = 0; j < kLanes; ++j) block += lanes[j];
    total += (double)block;
  }
  return total;
}

// dW[i] += Σ_r term(r, i) over all rows, by blocks of kColumnBlock columns (one task owns its
// columns, rows summed in order in double): the same bits at any thread count.
template <typename T, typename F>
void column_reduce(T* dw, int64_t rows, int64_t dim, F&& term) {
  const int64_t blocks = (dim + kColumnBlock - 1) / kColumnBlock;
  parallel_for(blocks, min_tasks(rows * kColumnBlock), [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kColumnBlock, width = std::min(kColumnBlock, dim - i0);
      double acc[kColumnBlock] = {};
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < width; ++j) acc[j] += (double)term(r, i0 + j);
      for (int64_t j = 0; j < width; ++j) dw[i0 + j] += (T)acc[j];
    }
  });
}

}  // namespace

// ---- RMSNorm ------------------------------------------------------------------------------------

template <typename T>
void rmsnorm_forward(const T* x, const T* w, T* out, T* rstd, int64_t rows, int64_t dim, T eps) {
  parallel_for(rows, min_tasks(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * dim;
      T* o = out + r * dim;
      const double sum = blocked_sum<T>(dim, [&](int64_t i) { return xr[i] * xr[i]; });
      const T scale = (T)(1.0 / std::sqrt(sum / (double)dim + (double)eps));
      rstd[r] = scale;
      for (int64_t i = 0; i < dim; ++i) o[i] = xr[i] * scale * w[i];
    }
  });
}

// out_i = x_i·r·w_i, r = (mean(x²) + eps)^(-1/2), dr/dx_j = −r³·x_j / dim:
//   dx_i = r·w_i·dout_i − x_i · r³/dim · Σ_j dout_j·w_j·x_j ;  dw_i = Σ_rows dout_i·x_i·r
template <typename T>
void rmsnorm_backward(const T* dout, const T* x, const T* w, const T* rstd, T* dx, T* dw, int64_t rows, int64_t dim) {
  parallel_for(rows, min_tasks(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = dout + r * dim;
      const T* xr = x + r * dim;
      T* d = dx + r * dim;
      const double dot = blocked_sum<T>(dim, [&](int64_t i) { return g[i] * w[i] * xr[i]; });
      const double s = (double)rstd[r];
      const T scale = rstd[r], coef = (T)(s * s * s * dot / (double)dim);
      for (int64_t i = 0; i < dim; ++i) d[i] += scale * w[i] * g[i] - coef * xr[i];
    }
  });
  column_reduce(dw, rows, dim, [&](int64_t r, int64_t i) { return dout[r * dim + i] * x[r * dim + i] * rstd[r]; });
}

// ---- Gated RMSNorm --------------------------------------------------------------------------------

namespace {
void check_groups(const char* op, int64_t dim, int64_t group_size) {
  if (group_size <= 0 || dim % group_size != 0)
    throw std::invalid_argument(std::string(op) + ": group_size " + std::to_string(group_size) +
                                " does not divide dim " + std::to_string(dim));
}
}  // namespace

template <typename T>
void gated_rmsnorm_forward(const T* y, const T* z, const T* w, T* out, T* rstd, int64_t rows, int64_t dim,
                           int64_t group_size, T eps, bool norm_before_gate) {
  check_groups("gated_rmsnorm_forward", dim, group_size);
  const int64_t groups = dim / group_size;
  parallel_for(rows * groups, min_tasks(group_size), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t at = q * group_size, col = (q % groups) * group_size;
      const T* yq = y + at;
      const T* zq = z + at;
      const T* wq = w + col;
      T* o = out + at;
      if (norm_before_gate) {
        // out = y·r·w ⊙ silu(z)
        const double sum = blocked_sum<T>(group_size, [&](int64_t i) { return yq[i] * yq[i]; });
        const T scale = (T)(1.0 / std::sqrt(sum / (double)group_size + (double)eps));
        rstd[q] = scale;
        for (int64_t i = 0; i < group_size; ++i) o[i] = yq[i] * scale * wq[i] * silu(zq[i]);
      } else {
        // out = s·r·w with s = y ⊙ silu(z), staged in out
        for (int64_t i = 0; i < group_size; ++i) o[i] = yq[i] * silu(zq[i]);
        const double sum = blocked_sum<T>(group_size, [&](int64_t i) { return o[i] * o[i]; });
        const T scale = (T)(1.0 / std::sqrt(sum / (double)group_size + (double)eps));
        rstd[q] = scale;
        for (int64_t i = 0; i < group_size; ++i) o[i] = o[i] * scale * wq[i];
      }
    }
  });
}

// norm_before_gate false, s = y ⊙ silu(z):  ds_i = r·w_i·dout_i − s_i · r³/n · Σ_j dout_j·w_j·s_j,
//   dy = ds ⊙ silu(z), dz = ds ⊙ y ⊙ silu'(z), dw = Σ dout ⊙ s·r.
// norm_before_gate true:  dz = dout ⊙ y·r·w ⊙ silu'(z);  dn = dout ⊙ w ⊙ silu(z),
//   dy_i = r·dn_i − y_i · r³/n · Σ_j dn_j·y_j,  dw = Σ dout ⊙ y·r ⊙ silu(z).
template <typename T>
void gated_rmsnorm_backward(const T* dout, const T* y, const T* z, const T* w, const T* rstd, T* dy, T* dz, T* dw,
                            int64_t rows, int64_t dim, int64_t group_size, bool norm_before_gate) {
  check_groups("gated_rmsnorm_backward", dim, group_size);
  const int64_t groups = dim / group_size;
  parallel_for(rows * groups, min_tasks(group_size), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t at = q * group_size, col = (q % groups) * group_size;
      const T* g = dout + at;
      const T* yq = y + at;
      const T* zq = z + at;
      const T* wq = w + col;
      T* dyq = dy + at;
      T* dzq = dz + at;
      const T scale = rstd[q];
      const double s3 = (double)scale * (double)scale * (double)scale / (double)group_size;
      if (norm_before_gate) {
        // dy is staged with dn
        for (int64_t i = 0; i < group_size; ++i) {
          dzq[i] = g[i] * yq[i] * scale * wq[i] * silu_grad(zq[i]);
          dyq[i] = g[i] * wq[i] * silu(zq[i]);
        }
        const double dot = blocked_sum<T>(group_size, [&](int64_t i) { return dyq[i] * yq[i]; });
        const T coef = (T)(s3 * dot);
        for (int64_t i = 0; i < group_size; ++i) dyq[i] = scale * dyq[i] - coef * yq[i];
      } else {
        const double dot = blocked_sum<T>(group_size, [&](int64_t i) { return g[i] * wq[i] * (yq[i] * silu(zq[i])); });
        const T coef = (T)(s3 * dot);
        for (int64_t i = 0; i < group_size; ++i) {
          const T gate = silu(zq[i]);
          const T ds = scale * wq[i] * g[i] - coef * (yq[i] * gate);
          dyq[i] = ds * gate;
          dzq[i] = ds * yq[i] * silu_grad(zq[i]);
        }
      }
    }
  });
  if (norm_before_gate)
    column_reduce(dw, rows, dim, [&](int64_t r, int64_t i) {
      const int64_t at = r * dim + i;
      return dout[at] * y[at] * rstd[r * groups + i / group_size] * silu(z[at]);
    });
  else
    column_reduce(dw, rows, dim, [&](int64_t r, int64_t i) {
      const int64_t at = r * dim + i;
      return dout[at] * (y[at] * silu(z[at])) * rstd[r * groups + i / group_size];
    });
}

// ---- Causal depthwise conv1d ----------------------------------------------------------------------

template <typename T>
void conv1d_forward(const T* x, const T* w, const T* bias, T* y, int64_t batch, int64_t length, int64_t channels,
                    int64_t kernel, bool silu_act) {
  // taps[k][c] = w[c,k], so each tap is one contiguous pass over a row's channels.
  std::vector<T> taps(kernel * channels);
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t k = 0; k < kernel; ++k) taps[k * channels + c] = w[c * kernel + k];
  parallel_for(batch * length, min_tasks(channels * kernel), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % length;
      T* yr = y + row * channels;
      for (int64_t c = 0; c < channels; ++c) yr[c] = bias ? bias[c] : T(0);
      for (int64_t k = 0; k < kernel; ++k) {
        const int64_t back = kernel - 1 - k;  // x row t - back
        if (back > t) continue;
        const T* xr = x + (row - back) * channels;
        const T* wk = taps.data() + k * channels;
        for (int64_t c = 0; c < channels; ++c) yr[c] += wk[c] * xr[c];
      }
      if (silu_act)
        for (int64_t c = 0; c < channels; ++c) yr[c] = silu(yr[c]);
    }
  });
}

// With g = dy ⊙ act'(pre):  dx[t] = Σ_k w[k] · g[t + K-1-k],  dw[c,k] = Σ_{b,t} g[t] · x[t+k-(K-1)],
// dbias = Σ g. One task owns a tile of kConvTile tokens of one sequence and every channel, so each
// pass reads whole rows (contiguous, vectorised over channels): it forms g for its tokens and the K-1
// after them (recomputing the pre-activation), then dx, and its tile's partial of dw and dbias. The
// partials are summed over tiles in order afterwards, so the result does not depend on the threads.
constexpr int64_t kConvTile = 64;

template <typename T>
void conv1d_backward(const T* dy, const T* x, const T* w, const T* bias, T* dx, T* dw, T* dbias, int64_t batch,
                     int64_t length, int64_t channels, int64_t kernel, bool silu_act) {
  const int64_t C = channels, K = kernel;
  std::vector<T> taps(K * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < K; ++k) taps[k * C + c] = w[c * K + k];
  const int64_t tiles_per_sequence = (length + kConvTile - 1) / kConvTile, tiles = batch * tiles_per_sequence;
  // Per tile: dw partial [K][C] then dbias partial [C].
  std::vector<T> partial(tiles * (K + 1) * C);
  parallel_for(tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> g((kConvTile + K - 1) * C);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / tiles_per_sequence, t0 = (tile % tiles_per_sequence) * kConvTile;
      const int64_t t1 = std::min(length, t0 + kConvTile), t_end = std::min(length, t1 + K - 1);
      // g for tokens [t0, t_end)
      for (int64_t t = t0; t < t_end; ++t) {
        const int64_t row = b * length + t;
        T* gr = g.data() + (t - t0) * C;
        for (int64_t c = 0; c < C; ++c) gr[c] = bias ? bias[c] : T(0);
        for (int64_t back = 0; back < K && back <= t; ++back) {
          const T* xr = x + (row - back) * C;
          const T* wk = taps.data() + (K - 1 - back) * C;
          for (int64_t c = 0; c < C; ++c) gr[c] += wk[c] * xr[c];
        }
        const T* dyr = dy + row * C;
        if (silu_act) {
          for (int64_t c = 0; c < C; ++c) gr[c] = dyr[c] * silu_grad(gr[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) gr[c] = dyr[c];
        }
      }
      T* pw = partial.data() + tile * (K + 1) * C;
      T* pb = pw + K * C;
      std::fill(pw, pw + (K + 1) * C, T(0));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = b * length + t;
        const T* gr = g.data() + (t - t0) * C;
        // dx[t] = Σ_m w[K-1-m] · g[t+m]
        T* dxr = dx + row * C;
        for (int64_t c = 0; c < C; ++c) dxr[c] = taps[(K - 1) * C + c] * gr[c];
        for (int64_t m = 1; m < K && t + m < length; ++m) {
          const T* gm = gr + m * C;
          const T* wk = taps.data() + (K - 1 - m) * C;
          for (int64_t c = 0; c < C; ++c) dxr[c] += wk[c] * gm[c];
        }
        for (int64_t c = 0; c < C; ++c) pb[c] += gr[c];
        for (int64_t back = 0; back < K && back <= t; ++back) {
          const T* xr = x + (row - back) * C;
          T* acc = pw + (K - 1 - back) * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += gr[c] * xr[c];
        }
      }
    }
  });
  // Tiles in order, in double, split over channels.
  parallel_for(C, 64, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      for (int64_t k = 0; k < K; ++k) {
        double sum = 0;
        for (int64_t tile = 0; tile < tiles; ++tile) sum += (double)partial[(tile * (K + 1) + k) * C + c];
        dw[c * K + k] += (T)sum;
      }
      if (dbias) {
        double sum = 0;
        for (int64_t tile = 0; tile < tiles; ++tile) sum += (double)partial[(tile * (K + 1) + K) * C + c];
        dbias[c] += (T)sum;
      }
    }
  });
}

// ---- Selective scan ---------------------------------------------------------------------------------

namespace {

// The shape bookkeeping of a scan: channels are split into blocks of kScanBlock within each group
// (a block never straddles two groups, so its dB / dC partial belongs to one group).
struct ScanLayout {
  int64_t per_group, blocks_per_group, blocks, chunks, chunk_rows;
  explicit ScanLayout(const ScanArgs& a) {
    if (a.groups <= 0 || a.channels % a.groups != 0)
      throw std::invalid_argument("scan: groups " + std::to_string(a.groups) + " does not divide channels " +
                                  std::to_string(a.channels));
    if (a.chunk < 1) throw std::invalid_argument("scan: chunk must be >= 1, got " + std::to_string(a.chunk));
    per_group = a.channels / a.groups;
    blocks_per_group = (per_group + kScanBlock - 1) / kScanBlock;
    blocks = a.groups * blocks_per_group;
    chunks = (a.length + a.chunk - 1) / a.chunk;
    chunk_rows = std::min(a.chunk, a.length);
  }
  // The group, first channel and channel count of block blk.
  void block(int64_t blk, int64_t* g, int64_t* d0, int64_t* count) const {
    *g = blk / blocks_per_group;
    const int64_t first = (blk % blocks_per_group) * kScanBlock;
    *d0 = *g * per_group + first;
    *count = std::min(kScanBlock, per_group - first);
  }
};

// silu(z) and silu'(z) for a row of channels.
template <typename T>
inline void gate_row(const T* z, int64_t count, T* gate, T* slope) {
  for (int64_t j = 0; j < count; ++j) {
    const T sg = sigmoid(z[j]);
    gate[j] = z[j] * sg;
    slope[j] = sg * (T(1) + z[j] * (T(1) - sg));
  }
}

// GCC's AVX-512 tuning prefers 256-bit vectors for loops it vectorises; the scan's lane loops are
// exactly 16 floats, one 512-bit register, so ask for that width here.
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")
#define MSSM_SCAN_WIDTH_PUSHED 1
#endif

// The scan works on blocks of kScanBlock channels held as lanes: a block's per-channel values of one
// token are a row of kSL lanes (zero past the block's last channel: u = 0, dy = 0 and A = 0 there, so
// those lanes keep a zero state, add nothing to any sum and are never written out), and its states are
// [N][kSL], n-major. Each update then runs over the 16 lanes with B_t[n], C_t[n] broadcast, and only
// the sums over channels (dB, dC) need a horizontal sum, one per (token, n).
constexpr int64_t kSL = kScanBlock;
static_assert(kSL == 16, "the scan's lane code and its row sums assume blocks of 16 channels");

// A task walks its tokens with a stride of a whole row of channels (D values, kilobytes), so a 4 KB
// page holds only a token or two of each input: too few for the hardware's stride prefetcher, and
// every row was a demand miss. The scan asks for the rows kAhead tokens ahead itself.
constexpr int64_t kAhead = 6;
template <typename T>
inline void prefetch_lanes(const T* p) {
  for (int64_t k = 0; k < (int64_t)(kSL * sizeof(T)); k += 64) __builtin_prefetch((const char*)p + k, 0, 3);
}
template <typename T>
inline void prefetch_lanes_for_write(T* p) {
  for (int64_t k = 0; k < (int64_t)(kSL * sizeof(T)); k += 64) __builtin_prefetch((char*)p + k, 1, 3);
}

// Row r of `count` values from src, zero-padded to kSL lanes.
template <typename T>
inline void load_lanes(const T* src, int64_t count, T* dst) {
  if (count == kSL) {
    std::memcpy(dst, src, kSL * sizeof(T));
    return;
  }
  for (int64_t j = 0; j < count; ++j) dst[j] = src[j];
  for (int64_t j = count; j < kSL; ++j) dst[j] = T(0);
}
// [N][kSL] lanes from / to the [channels][N] rows of a block's `count` channels (src / dst at channel d0).
template <typename T>
inline void lanes_from_rows(const T* src, int64_t count, int64_t N, T* dst) {
  std::fill(dst, dst + N * kSL, T(0));
  for (int64_t j = 0; j < count; ++j)
    for (int64_t n = 0; n < N; ++n) dst[n * kSL + j] = src[j * N + n];
}
template <typename T>
inline void lanes_to_rows(const T* src, int64_t count, int64_t N, T* dst) {
  for (int64_t j = 0; j < count; ++j)
    for (int64_t n = 0; n < N; ++n) dst[j * N + n] = src[n * kSL + j];
}

// out[r] = Σ_j X[r][j]·w[j] over the kSL lanes of each of `rows` rows, summed as a fixed tree: lane j
// with lane j + 8, then j with j + 4, then j + 2, then j + 1. On AVX-512 (float) 16 rows at a time by
// a transposing reduction (15 additions for 16 rows, where a horizontal sum per row takes 4 each), in
// the same order.
#if defined(__AVX512F__)
inline void weighted_rowsums16(const float* X, __m512 w, float* out) {
  __m512 v[16], p[8], q[4], h[2];
  for (int r = 0; r < 16; ++r) v[r] = _mm512_mul_ps(_mm512_loadu_ps(X + r * 16), w);
  // p[k]: lanes 0-7 row 2k, 8-15 row 2k+1, each as lane j + lane j+8
  for (int k = 0; k < 8; ++k)
    p[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // q[k]: 128-bit lane i holds row 4k+i's four sums (j + j+4)
  for (int k = 0; k < 4; ++k)
    q[k] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // h[k]: 128-bit lane i holds rows 8k+i and 8k+4+i, two sums each (j + j+2)
  for (int k = 0; k < 2; ++k)
    h[k] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * k], q[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(q[2 * k], q[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // element 4i+k holds row 4k+i
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(h[0], h[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(h[0], h[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(out, _mm512_permutexvar_ps(order, sums));
}
#endif
// a·b + c as one fused multiply-add where the CPU level has them. The state update is written with it so
// that the backward's recomputation rounds exactly as the forward did (left to the compiler, which of
// a·s and dtu·B gets fused can differ between the two loops, and the chunk would change the results).
template <typename T>
inline T mul_add(T a, T b, T c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;  // no fused multiply-add here, so none is contracted either
#endif
}

// The decays' exponent scale. On AVX-512 a float decay is 2^(dt·A·log2 e) by simd::Exp2 (the inference
// scan's table-driven 2^x, about half the work of exp_poly; relative error about 1.2e-7·|dt·A| from
// rounding A·log2 e and the product, as native/cpu/selective_scan.cpp states), so the lanes the
// recurrence reads (AE) hold A·kDecayScale; elsewhere, and for double, AE is A and the decay exp_fast.
template <typename T>
constexpr T decay_scale() {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return 1.44269504088896341f;
#endif
  return T(1);
}

// One token of the recurrence for a block, over lanes: s = a ⊙ sp + dtu·B[n] per n, with the decay
// a = exp(dt ⊙ A[n]); yc += s·C[n]; the decays are stored to dec ([N][kSL]) when dec is given. s may
// be sp (the forward updates in place). AE: A·decay_scale<T>() in lanes ([N][kSL]). (yc is always
// summed: the loop without it was left unvectorised.) The forward and the backward's recomputation
// both run this function, so they round alike.
template <typename T>
inline void scan_token(int64_t N, const T* AE, const T* dt, const T* dtu, const T* Bt, const T* Ct, const T* sp,
                       T* s, T* dec, T* yc) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    // y sums over n in two interleaved chains (even and odd n), so that the loop is not one long
    // chain of dependent multiply-adds. v ≥ -1e30 keeps Exp2's argument finite (dt = ∞ gives 0).
    const cpu::MSSM_LEVEL::simd::Exp2 exp2;
    const __m512 lo = _mm512_set1_ps(-1e30f);
    const __m512 dtv = _mm512_loadu_ps(dt), dtuv = _mm512_loadu_ps(dtu);
    __m512 even = _mm512_loadu_ps(yc), odd = _mm512_setzero_ps();
    // State n's update; returns s_t[n] for y.
    auto update = [&](int64_t n) {
      const __m512 a = exp2(_mm512_max_ps(_mm512_mul_ps(dtv, _mm512_loadu_ps(AE + n * kSL)), lo));
      if (dec) _mm512_storeu_ps(dec + n * kSL, a);
      const __m512 v =
          _mm512_fmadd_ps(a, _mm512_loadu_ps(sp + n * kSL), _mm512_mul_ps(dtuv, _mm512_set1_ps(Bt[n])));
      _mm512_storeu_ps(s + n * kSL, v);
      return v;
    };
    int64_t n = 0;
    for (; n + 2 <= N; n += 2) {
      even = _mm512_fmadd_ps(update(n), _mm512_set1_ps(Ct[n]), even);
      odd = _mm512_fmadd_ps(update(n + 1), _mm512_set1_ps(Ct[n + 1]), odd);
    }
    if (n < N) even = _mm512_fmadd_ps(update(n), _mm512_set1_ps(Ct[n]), even);
    _mm512_storeu_ps(yc, _mm512_add_ps(even, odd));
    return;
  }
#endif
  T acc[kSL];  // yc in a register: summed through memory, each n waited on a store-to-load forward
  std::memcpy(acc, yc, sizeof acc);
  for (int64_t n = 0; n < N; ++n) {
    const T bn = Bt[n], cn = Ct[n];
    const T* An = AE + n * kSL;
    const T* spn = sp + n * kSL;
    T* sn = s + n * kSL;
    T a[kSL], v[kSL];
    for (int64_t j = 0; j < kSL; ++j) a[j] = exp_fast(dt[j] * An[j]);
    if (dec) std::memcpy(dec + n * kSL, a, sizeof a);
    for (int64_t j = 0; j < kSL; ++j) {
      v[j] = mul_add(a[j], spn[j], dtu[j] * bn);
      acc[j] = mul_add(v[j], cn, acc[j]);
    }
    std::memcpy(sn, v, sizeof v);
  }
  std::memcpy(yc, acc, sizeof acc);
}

// kSL lanes as one GCC vector (one zmm for float on AVX-512; split by the compiler elsewhere), so that
// the walk's accumulators stay in registers (as arrays GCC kept them on the stack, each n waiting on
// a store-to-load forward).
template <typename T>
struct LanesOf;
template <>
struct LanesOf<float> {
  typedef float type __attribute__((vector_size(kSL * sizeof(float))));
};
template <>
struct LanesOf<double> {
  typedef double type __attribute__((vector_size(kSL * sizeof(double))));
};
template <typename T>
using Lanes = typename LanesOf<T>::type;
// (by reference: a vector argument or return value warns of an ABI change below AVX-512)
template <typename T>
inline void lanes_load(Lanes<T>& v, const T* p) {
  std::memcpy(&v, p, sizeof v);
}
template <typename T>
inline void lanes_store(T* p, const Lanes<T>& v) {
  std::memcpy(p, &v, sizeof v);
}
// `count` values from src into lanes, zero past them; and the first `count` lanes out to dst.
template <typename T>
inline void lanes_load(Lanes<T>& v, const T* src, int64_t count) {
  if (count == kSL) {
    std::memcpy(&v, src, sizeof v);
    return;
  }
  v = Lanes<T>{};
  for (int64_t j = 0; j < count; ++j) v[j] = src[j];
}
template <typename T>
inline void lanes_store(T* dst, const Lanes<T>& v, int64_t count) {
  if (count == kSL) {
    std::memcpy(dst, &v, sizeof v);
    return;
  }
  for (int64_t j = 0; j < count; ++j) dst[j] = v[j];
}

template <typename T>
inline void weighted_rowsums(const T* X, const Lanes<T>& w, int64_t rows, T* out) {
  int64_t r = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 wv = (__m512)w;
    for (; r + 16 <= rows; r += 16) weighted_rowsums16(X + r * kSL, wv, out + r);
  }
#endif
  for (; r < rows; ++r) {
    T p[kSL];
    for (int64_t j = 0; j < kSL; ++j) p[j] = X[r * kSL + j] * w[j];
    for (int64_t h = kSL / 2; h >= 1; h /= 2)
      for (int64_t j = 0; j < h; ++j) p[j] += p[j + h];
    out[r] = p[0];
  }
}

// One token of the backward walk for a block, over lanes (see scan_backward): updates the state
// adjoint ds and dA in place, leaves ds_t (before the decay) in dst for dB, and returns Σ_n da·A and
// Σ_n ds_t·B per lane in sum_a, sum_b. ad holds the token's decays ([N][kSL]); it may be dst (each
// decay is read before its lane is overwritten).
template <typename T>
inline void scan_adjoint(int64_t N, const T* AT, const T* dt, const T* dyc, const T* Bt, const T* Ct, const T* sp,
                         const T* ad, T* ds, T* dA, T* dst, Lanes<T>& sum_a, Lanes<T>& sum_b) {
  using V = Lanes<T>;
  V sa = {}, sb = {}, y, w;
  lanes_load(y, dyc);
  lanes_load(w, dt);
  for (int64_t n = 0; n < N; ++n) {
    const T bn = Bt[n], cn = Ct[n];
    V dsn, spn, dAn, decay, An;
    lanes_load(dsn, ds + n * kSL);
    lanes_load(spn, sp + n * kSL);
    lanes_load(dAn, dA + n * kSL);
    lanes_load(decay, ad + n * kSL);
    lanes_load(An, AT + n * kSL);
    const V d = y * cn + dsn;
    const V da = d * spn * decay;
    dAn += da * w;
    sa += da * An;
    sb += d * bn;
    const V next = d * decay;
    lanes_store(dst + n * kSL, d);
    lanes_store(ds + n * kSL, next);
    lanes_store(dA + n * kSL, dAn);
  }
  sum_a = sa;
  sum_b = sb;
}

// Per-thread values of the backward: states and decays / state adjoints [chunk][N][kSL]; dt, d dt/dΔ
// and dyc [chunk][kSL]; the block's A, A·decay_scale, start state, state adjoint and dA partial
// [N][kSL].
int64_t scan_thread_values(const ScanArgs& a, const ScanLayout& l) {
  return l.chunk_rows * kSL * (2 * a.state + 3) + 5 * kSL * a.state;
}
int64_t scan_shared_values(const ScanArgs& a, const ScanLayout& l) {
  return 2 * a.batch * a.channels * a.state + 2 * a.batch * a.channels + 2 * a.batch * l.blocks * l.chunk_rows * a.state;
}

}  // namespace

template <typename T>
void scan_forward(const ScanArgs& a, const ScanTensors<T>& in, T* y, T* boundary) {
  const ScanLayout l(a);
  const int64_t L = a.length, D = a.channels, N = a.state, G = a.groups;
  const DtRule<T> rule{a.softplus, (T)a.dt_min, (T)a.dt_max};
  parallel_for(a.batch * l.blocks, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(2 * N * kSL);
    T* S = buf.data();        // [N][kSL]
    T* AT = S + N * kSL;      // [N][kSL], A·decay_scale
    T bias[kSL], Dl[kSL], del[kSL], ul[kSL], zl[kSL], dts[kSL], slopes[kSL], dtu[kSL], yc[kSL], gates[kSL],
        gate_slopes[kSL];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / l.blocks;
      int64_t g, d0, count;
      l.block(task % l.blocks, &g, &d0, &count);
      lanes_from_rows(in.A + d0 * N, count, N, AT);
      for (int64_t i = 0; i < N * kSL; ++i) AT[i] *= decay_scale<T>();
      if (in.delta_bias)
        load_lanes(in.delta_bias + d0, count, bias);
      else
        std::fill(bias, bias + kSL, T(0));
      if (in.D) load_lanes(in.D + d0, count, Dl);
      std::fill(S, S + N * kSL, T(0));
      for (int64_t t = 0; t < L; ++t) {
        if (t % a.chunk == 0) lanes_to_rows(S, count, N, boundary + ((b * l.chunks + t / a.chunk) * D + d0) * N);
        const int64_t row = b * L + t;
        const T* Bt = in.B + (row * G + g) * N;
        const T* Ct = in.C + (row * G + g) * N;
        const int64_t i0 = row * D + d0;
        if (t + kAhead < L) {
          const int64_t ia = i0 + kAhead * D;
          prefetch_lanes(in.delta + ia);
          prefetch_lanes(in.u + ia);
          if (in.z) prefetch_lanes(in.z + ia);
          prefetch_lanes_for_write(y + ia);
        }
        load_lanes(in.delta + i0, count, del);
        load_lanes(in.u + i0, count, ul);
        rule.row(del, bias, kSL, dts, slopes);
        for (int64_t j = 0; j < kSL; ++j) {
          dtu[j] = dts[j] * ul[j];
          yc[j] = T(0);
        }
        scan_token<T>(N, AT, dts, dtu, Bt, Ct, S, S, nullptr, yc);
        if (in.D)
          for (int64_t j = 0; j < kSL; ++j) yc[j] += Dl[j] * ul[j];
        if (in.z) {
          load_lanes(in.z + i0, count, zl);
          gate_row(zl, kSL, gates, gate_slopes);
          for (int64_t j = 0; j < count; ++j) y[i0 + j] = yc[j] * gates[j];
        } else {
          for (int64_t j = 0; j < count; ++j) y[i0 + j] = yc[j];
        }
      }
    }
  });
}

// Per chunk, last to first: each task (batch, channel block) recomputes its states and decays inside
// the chunk from the boundary state, then walks the chunk's tokens backwards with the state adjoint
// ds (carried across chunks in `carry`):
//   ds_t += dyc_t·C_t;  dC_t += dyc_t·s_t;  da = ds_t ⊙ s_{t-1} ⊙ a_t  (the adjoint of dt·A)
//   dA += da·dt;  ddt = Σ_n da·A + u·Σ_n ds_t·B_t;  du = dt·Σ_n ds_t·B_t + D·dyc;  dB_t += ds_t·dt·u
//   ds_{t-1} = a_t ⊙ ds_t
// All of it runs over the block's 16 channels as lanes, so the sums over n are lane-wise; the sums
// over channels (dB_t, dC_t) are one fixed-order 16-lane sum per (token, n), taken while s_t (in the
// recomputation) and ds_t (in the walk) are still in L1. The block's dB / dC contributions go to a per-block partial of the chunk,
// which is then summed over the blocks of each group in block order; dA, dD and ddelta_bias are
// accumulated per token into per-batch partials (carried across chunks, so the chunk does not change
// their order), then summed over batches in order.
template <typename T>
void scan_backward(const ScanArgs& a, const ScanTensors<T>& in, const T* boundary, const T* dy, const ScanGrads<T>& out) {
  const ScanLayout l(a);
  const int64_t L = a.length, D = a.channels, N = a.state, G = a.groups, Q = l.chunk_rows;
  const DtRule<T> rule{a.softplus, (T)a.dt_min, (T)a.dt_max};
  const int threads = num_threads();
  const int64_t per_thread = scan_thread_values(a, l);
  // Left uninitialised (zeroing them was a serial memset on the calling thread): every value is
  // written before it is read; the carried ones start at zero in the last chunk, the first walked.
  auto buffer = [](int64_t n) { return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]); };
  const auto scratch = buffer(per_thread * threads);
  const auto carry = buffer(a.batch * D * N), dA_part = buffer(a.batch * D * N);
  const auto dD_part = buffer(a.batch * D), bias_part = buffer(a.batch * D);
  const auto dB_part = buffer(a.batch * l.blocks * Q * N), dC_part = buffer(a.batch * l.blocks * Q * N);

  for (int64_t c = l.chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * a.chunk, len = std::min(a.chunk, L - t0);
    parallel_for(a.batch * l.blocks, [&](int64_t begin, int64_t end) {
      const int slot = thread_index();
      std::vector<T> own;  // only if the pool grew since `threads` was read
      T* work;
      if (slot < threads) {
        work = scratch.get() + slot * per_thread;
      } else {
        own.resize(per_thread);
        work = own.data();
      }
      T* S = work;                     // s_t                                   [Q][N][kSL]
      T* X = S + Q * N * kSL;          // a_t (general path), then ds_t         [Q][N][kSL]
      T* dts = X + Q * N * kSL;        // dt                                    [Q][kSL]
      T* dgrad = dts + Q * kSL;        // d dt / dΔ                             [Q][kSL]
      T* ycs = dgrad + Q * kSL;        // dyc                                   [Q][kSL]
      T* AT = ycs + Q * kSL;           // A                                     [N][kSL]
      T* AE = AT + N * kSL;            // A·decay_scale (the recomputation's)   [N][kSL]
      T* S0 = AE + N * kSL;            // the chunk's start state               [N][kSL]
      T* ds = S0 + N * kSL;            // the state adjoint                     [N][kSL]
      T* dAl = ds + N * kSL;           // dA partial                            [N][kSL]
      T bias[kSL], Dl[kSL], del[kSL], ul[kSL], zl[kSL], dyl[kSL], gates[kSL], gate_slopes[kSL], dDl[kSL], biasl[kSL];
      using V = Lanes<T>;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / l.blocks, blk = task % l.blocks;
        int64_t g, d0, count;
        l.block(blk, &g, &d0, &count);
        lanes_from_rows(in.A + d0 * N, count, N, AT);
        for (int64_t i = 0; i < N * kSL; ++i) AE[i] = AT[i] * decay_scale<T>();
        if (in.delta_bias)
          load_lanes(in.delta_bias + d0, count, bias);
        else
          std::fill(bias, bias + kSL, T(0));
        if (in.D) load_lanes(in.D + d0, count, Dl);
        lanes_from_rows(boundary + ((b * l.chunks + c) * D + d0) * N, count, N, S0);
        if (c == l.chunks - 1) {
          std::fill(ds, ds + 2 * N * kSL, T(0));  // ds and dAl
          std::fill(dDl, dDl + kSL, T(0));
          std::fill(biasl, biasl + kSL, T(0));
        } else {
          lanes_from_rows(carry.get() + (b * D + d0) * N, count, N, ds);
          lanes_from_rows(dA_part.get() + (b * D + d0) * N, count, N, dAl);
          load_lanes(dD_part.get() + b * D + d0, count, dDl);
          load_lanes(bias_part.get() + b * D + d0, count, biasl);
        }

        T* pB = dB_part.get() + (b * l.blocks + blk) * Q * N;
        T* pC = dC_part.get() + (b * l.blocks + blk) * Q * N;

        // Recompute the chunk's states exactly as the forward did; with each token's state still in
        // L1, dz and dC_t = Σ_j s_t[·][j]·dyc[j] (dyc = dy·silu(z) needs nothing from the walk).
        for (int64_t tl = 0; tl < len; ++tl) {
          const int64_t row = b * L + t0 + tl;
          const T* Bt = in.B + (row * G + g) * N;
          const T* Ct = in.C + (row * G + g) * N;
          const int64_t i0 = row * D + d0;
          T* dt = dts + tl * kSL;
          T* dycs = ycs + tl * kSL;
          if (tl + kAhead < len) {
            const int64_t ia = i0 + kAhead * D;
            prefetch_lanes(in.delta + ia);
            prefetch_lanes(in.u + ia);
            prefetch_lanes(dy + ia);
            if (in.z) {
              prefetch_lanes(in.z + ia);
              prefetch_lanes_for_write(out.dz + ia);
            }
          }
          load_lanes(in.delta + i0, count, del);
          load_lanes(in.u + i0, count, ul);
          rule.row(del, bias, kSL, dt, dgrad + tl * kSL);
          T dtu[kSL], yc[kSL];
          for (int64_t j = 0; j < kSL; ++j) {
            dtu[j] = dt[j] * ul[j];
            yc[j] = T(0);
          }
          const T* sp = tl ? S + (tl - 1) * N * kSL : S0;
          T* s = S + tl * N * kSL;
          scan_token<T>(N, AE, dt, dtu, Bt, Ct, sp, s, X + tl * N * kSL, yc);
          load_lanes(dy + i0, count, dyl);
          if (in.z) {
            if (in.D)
              for (int64_t j = 0; j < kSL; ++j) yc[j] += Dl[j] * ul[j];
            load_lanes(in.z + i0, count, zl);
            gate_row(zl, kSL, gates, gate_slopes);
            for (int64_t j = 0; j < count; ++j) out.dz[i0 + j] = dyl[j] * yc[j] * gate_slopes[j];
            for (int64_t j = 0; j < kSL; ++j) dycs[j] = dyl[j] * gates[j];
          } else {
            std::memcpy(dycs, dyl, kSL * sizeof(T));
          }
          V dycv;
          lanes_load(dycv, dycs);
          weighted_rowsums(s, dycv, N, pC + tl * N);
        }

        // Walk the chunk backwards; dB_t = Σ_j ds_t[·][j]·(dt·u)[j] while ds_t is in L1. The per-token
        // lane values stay in vector registers (as arrays they went through the stack, and the dD /
        // delta_bias sums carried a store-to-load forward from token to token).
        V dDv, biasv, Dv = {};
        lanes_load(dDv, dDl);
        lanes_load(biasv, biasl);
        if (in.D) lanes_load(Dv, Dl);
        for (int64_t tl = len - 1; tl >= 0; --tl) {
          const int64_t i0 = (b * L + t0 + tl) * D + d0;
          const T* Bt = in.B + ((b * L + t0 + tl) * G + g) * N;
          const T* Ct = in.C + ((b * L + t0 + tl) * G + g) * N;
          if (tl >= kAhead) {
            const int64_t ia = i0 - kAhead * D;
            prefetch_lanes(in.u + ia);
            prefetch_lanes_for_write(out.du + ia);
            prefetch_lanes_for_write(out.ddelta + ia);
          }
          V dtv, dycv, grv, uv, sa, sb;
          lanes_load(dtv, dts + tl * kSL);
          lanes_load(dycv, ycs + tl * kSL);
          lanes_load(grv, dgrad + tl * kSL);
          lanes_load(uv, in.u + i0, count);
          const T* sp = tl ? S + (tl - 1) * N * kSL : S0;
          T* Xt = X + tl * N * kSL;
          const T* dt = dts + tl * kSL;
          const T* dyc = ycs + tl * kSL;
          scan_adjoint<T>(N, AT, dt, dyc, Bt, Ct, sp, Xt, ds, dAl, Xt, sa, sb);
          const V duv = dtv * sb + Dv * dycv;  // Dv is zero without D
          const V ddv = (sa + uv * sb) * grv;
          dDv += dycv * uv;
          biasv += ddv;
          weighted_rowsums(Xt, dtv * uv, N, pB + tl * N);
          lanes_store(out.du + i0, duv, count);
          lanes_store(out.ddelta + i0, ddv, count);
        }
        lanes_store(dDl, dDv);
        lanes_store(biasl, biasv);

        lanes_to_rows(ds, count, N, carry.get() + (b * D + d0) * N);
        lanes_to_rows(dAl, count, N, dA_part.get() + (b * D + d0) * N);
        std::memcpy(dD_part.get() + b * D + d0, dDl, count * sizeof(T));
        std::memcpy(bias_part.get() + b * D + d0, biasl, count * sizeof(T));
      }
    });
    // dB, dC of the chunk's tokens: the blocks of each group, in block order.
    parallel_for(a.batch * len, min_tasks(l.blocks * N * 2), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / len, tl = r % len;
        for (int64_t g = 0; g < G; ++g) {
          T* oB = out.dB + ((b * L + t0 + tl) * G + g) * N;
          T* oC = out.dC + ((b * L + t0 + tl) * G + g) * N;
          std::fill(oB, oB + N, T(0));
          std::fill(oC, oC + N, T(0));
          for (int64_t k = 0; k < l.blocks_per_group; ++k) {
            const int64_t at = ((b * l.blocks + g * l.blocks_per_group + k) * Q + tl) * N;
            for (int64_t n = 0; n < N; ++n) {
              oB[n] += dB_part[at + n];
              oC[n] += dC_part[at + n];
            }
          }
        }
      }
    });
  }
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t i = 0; i < D * N; ++i) out.dA[i] += dA_part[b * D * N + i];
    if (out.dD && in.D)
      for (int64_t d = 0; d < D; ++d) out.dD[d] += dD_part[b * D + d];
    if (out.ddelta_bias && in.delta_bias)
      for (int64_t d = 0; d < D; ++d) out.ddelta_bias[d] += bias_part[b * D + d];
  }
}

#if defined(MSSM_SCAN_WIDTH_PUSHED)
#pragma GCC pop_options
#undef MSSM_SCAN_WIDTH_PUSHED
#endif

int64_t scan_backward_scratch_bytes(const ScanArgs& a) {
  const ScanLayout l(a);
  return (scan_thread_values(a, l) * num_threads() + scan_shared_values(a, l)) * (int64_t)sizeof(float);
}

// ---- Softmax cross-entropy --------------------------------------------------------------------------

template <typename T>
double cross_entropy(T* logits, const int32_t* targets, int64_t rows, int64_t vocab, T scale, int64_t* count) {
  int64_t used = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] >= vocab)
      throw std::out_of_range("cross_entropy: target " + std::to_string(targets[r]) + " of row " + std::to_string(r) +
                              " is outside the vocabulary of " + std::to_string(vocab));
    if (targets[r] >= 0) ++used;
  }
  std::vector<double> loss(rows, 0.0);
  parallel_for(rows, min_tasks(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* l = logits + r * vocab;
      const int32_t target = targets[r];
      if (target < 0) {
        std::fill(l, l + vocab, T(0));
        continue;
      }
      T top = l[0];
      for (int64_t i = 1; i < vocab; ++i) top = std::max(top, l[i]);
      const T picked = l[target];
      // l ← exp(l − max), summed as it is written
      const double sum = blocked_sum<T>(vocab, [&](int64_t i) { return l[i] = exp_fast(l[i] - top); });
      // −log softmax[target] = log Σ exp(l − max) + (max − l[target])
      loss[r] = std::log(sum) + ((double)top - (double)picked);
      const T factor = (T)((double)scale / sum);
      for (int64_t i = 0; i < vocab; ++i) l[i] *= factor;
      l[target] -= scale;
    }
  });
  if (count) *count += used;
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) total += loss[r];
  return total;
}

// ---- Transpose --------------------------------------------------------------------------------------

namespace {

constexpr int64_t kTransposeRows = 64;

// The 8 × 8 block at src (rows `ld_src` apart) into dst (rows `ld_dst` apart), transposed.
#if defined(__AVX__)
inline void transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}
#endif

}  // namespace

template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  // Tasks of kTransposeRows source rows, every column: each writes a kTransposeRows-wide strip of dst.
  parallel_for((rows + kTransposeRows - 1) / kTransposeRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r0 = task * kTransposeRows, r1 = std::min(rows, r0 + kTransposeRows);
      int64_t r = r0;
#if defined(__AVX__)
      if constexpr (std::is_same_v<T, float>) {
        for (; r + 8 <= r1; r += 8) {
          int64_t c = 0;
          for (; c + 8 <= cols; c += 8) transpose8x8(src + r * cols + c, cols, dst + c * rows + r, rows);
          for (; c < cols; ++c)
            for (int64_t i = 0; i < 8; ++i) dst[c * rows + r + i] = src[(r + i) * cols + c];
        }
      }
#endif
      for (; r < r1; ++r)
        for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
    }
  });
}

// ---- Weight gradient ------------------------------------------------------------------------------
//
// dW[N,K] += dYᵀ·X as a sum of outer products, without transposing either operand. A register tile of
// R rows of n × V vectors of k (AVX-512: 8 × 2 zmm = 8 × 32 floats, 16 accumulators) takes, per row m,
// V loads of X[m, k0:], R broadcasts of dY[m, n0:] and R·V FMAs. (8 × 2 measured faster here than
// 4 × 4: the 4-wide tile loads one X vector per 4 FMAs and stalls at ~75% of the FMA peak.)
//
// Blocking: the rows are walked in blocks of MB (WgShape). Per block a task packs its dY columns as
// [tile of R n][m][R] and its X columns as [strip of W = VMAX·L k][m][≤ W] (zero-padded at the edges,
// so the tile kernel has no edge cases until its final add), then runs every (tile, strip) pair: one
// tile of dY (MB × R values, 4 KiB for AVX-512) stays in L1 while the task's X strips pass from L2.
// The tile's sum over the block's rows is added into dW at the end of each block.
//
// Determinism: dW[n,k] = ((dW + S_0) + S_1) + … with S_b the block's rows summed in row order from 0,
// whatever the tasks: tasks are rectangles of dW (blocks of n × blocks of k) sized by the thread count
// only for load balance, never changing any sum. dbias[n] is summed over all rows in order in double.
namespace {

// R rows of n per tile, L lanes per vector, at most VMAX vectors per tile row (a strip is
// W = L·VMAX columns of k), MB rows per block. The plain path (L = 1) does any width ≤ W in one tile.
template <typename T>
struct WgShape;
#if defined(__AVX512F__)
template <>
struct WgShape<float> {
  static constexpr int R = 8, L = 16, VMAX = 2;  // 16 accumulators + 2 X vectors + broadcasts of 32 zmm
  static constexpr int64_t MB = 128;
};
#elif defined(__AVX2__) && defined(__FMA__)
template <>
struct WgShape<float> {
  static constexpr int R = 4, L = 8, VMAX = 3;  // 12 accumulators + 3 X vectors + 1 broadcast = 16 ymm
  static constexpr int64_t MB = 256;
};
#else
template <>
struct WgShape<float> {
  static constexpr int R = 4, L = 1, VMAX = 64;
  static constexpr int64_t MB = 128;
};
#endif
template <>
struct WgShape<double> {
  static constexpr int R = 4, L = 1, VMAX = 32;
  static constexpr int64_t MB = 128;
};

// dw[r, j] += acc[r][j] for r < rows, j < width; acc rows `stride` apart.
template <typename T>
inline void wg_add(T* dw, int64_t ldw, const T* acc, int stride, int rows, int width) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < width; ++j) dw[r * ldw + j] += acc[r * stride + j];
}

// dw[r, j] += Σ_m dyp[m][r] · xp[m][j] for r < rows, j < width; dyp [mb][R], xp [mb][width].
template <typename T, int R>
inline void wg_tile_plain(const T* dyp, const T* xp, int64_t mb, T* dw, int64_t ldw, int rows, int width) {
  T acc[R][64] = {};
  for (int64_t m = 0; m < mb; ++m) {
    const T* xr = xp + m * width;
    for (int r = 0; r < R; ++r) {
      const T g = dyp[m * R + r];
      for (int j = 0; j < width; ++j) acc[r][j] += g * xr[j];
    }
  }
  wg_add(dw, ldw, &acc[0][0], 64, rows, width);
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// As wg_tile_plain in simd.h's vectors (kWidth floats), with dY's R values of row m at dyp + m·ldg and
// X's V vectors at xp + m·ldx (zero-padded beyond width). The accumulators are only ever indexed by
// constants (the edge add goes through memory), so they stay in registers.
template <int R, int V>
inline void wg_tile_simd(const float* dyp, int64_t ldg, const float* xp, int64_t ldx, int64_t mb, float* dw,
                         int64_t ldw, int rows, int width) {
  using namespace cpu::MSSM_LEVEL::simd;
  vec acc[R * V];
  for (int i = 0; i < R * V; ++i) acc[i] = vset(0.0f);
  for (int64_t m = 0; m < mb; ++m) {
    vec xv[V];
    for (int v = 0; v < V; ++v) xv[v] = vload(xp + m * ldx + v * kWidth);
    const float* g = dyp + m * ldg;
    for (int r = 0; r < R; ++r) {
      const vec b = vset(g[r]);
      for (int v = 0; v < V; ++v) acc[r * V + v] = vfma(b, xv[v], acc[r * V + v]);
    }
  }
  if (rows == R && width == V * kWidth) {
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) {
        float* p = dw + r * ldw + v * kWidth;
        vstore(p, vadd(vload(p), acc[r * V + v]));
      }
    return;
  }
  float tmp[R * V * kWidth];
  for (int i = 0; i < R * V; ++i) vstore(tmp + i * kWidth, acc[i]);
  wg_add(dw, ldw, tmp, (int)(V * kWidth), rows, width);
}
#endif

// One tile of `vectors` vectors: dY rows ldg apart, X rows ldx apart (as packed: R and vectors · L).
template <typename T>
inline void wg_tile(int vectors, const T* dyp, int64_t ldg, const T* xp, int64_t ldx, int64_t mb, T* dw, int64_t ldw,
                    int rows, int width) {
  constexpr int R = WgShape<T>::R;
  if constexpr (std::is_same_v<T, float> && WgShape<T>::L > 1) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    constexpr int VMAX = WgShape<T>::VMAX;
    static_assert(WgShape<T>::L == cpu::MSSM_LEVEL::simd::kWidth && (VMAX == 2 || VMAX == 3),
                  "one case per vector count");
    if (vectors == 1) return wg_tile_simd<R, 1>(dyp, ldg, xp, ldx, mb, dw, ldw, rows, width);
    if (VMAX == 2 || vectors == 2) return wg_tile_simd<R, 2>(dyp, ldg, xp, ldx, mb, dw, ldw, rows, width);
    if constexpr (VMAX == 3) return wg_tile_simd<R, 3>(dyp, ldg, xp, ldx, mb, dw, ldw, rows, width);
#endif
  }
  (void)ldg, (void)ldx;  // packed: R and vectors · L, what the plain kernel assumes
  wg_tile_plain<T, R>(dyp, xp, mb, dw, ldw, rows, width);
}

// 64-byte aligned scratch of n values.
template <typename T>
struct AlignedScratch {
  std::unique_ptr<T[]> owner;
  T* data;
  explicit AlignedScratch(int64_t n) : owner(new T[n + 64 / sizeof(T)]) {
    const uintptr_t a = (uintptr_t)owner.get();
    data = (T*)((a + 63) & ~(uintptr_t)63);
  }
};

}  // namespace

template <typename T>
void weight_grad(const T* dy, const T* x, T* dw, T* dbias, int64_t M, int64_t N, int64_t K) {
  if (M <= 0 || N <= 0) return;
  if (!dw) {  // the bias alone: column sums in double, rows in order (as the tiled path below sums them)
    if (dbias)
      parallel_for(N, 64, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          double sum = 0;
          for (int64_t m = 0; m < M; ++m) sum += (double)dy[m * N + n];
          dbias[n] += (T)sum;
        }
      });
    return;
  }
  using Shape = WgShape<T>;
  constexpr int L = Shape::L;
  constexpr int64_t W = (int64_t)L * Shape::VMAX, MB = Shape::MB, R = Shape::R;
  if (L > 1 && K <= W / 2 && N >= 2 * W) {
    // A narrow X (dt_proj's rank 16): half-empty strips, and every packed dY value would serve only K
    // multiply-adds. The same sums with the roles swapped, dWᵀ = Xᵀ·dY, read dY in place in full
    // strips (3.5× faster at 4096 × 512 × 16); dWᵀ is then added into dW.
    std::vector<T> dwt((size_t)(K * N), T(0));
    weight_grad(x, dy, dwt.data(), (T*)nullptr, M, K, N);
    parallel_for(N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t k = 0; k < K; ++k) dw[n * K + k] += dwt[k * N + n];
    });
    if (dbias) weight_grad(dy, x, (T*)nullptr, dbias, M, N, K);
    return;
  }
  // Tasks: blocks of nb rows of dW × blocks of ks strips of k. A task packs its X columns once per row
  // block and reuses them for nb / R tiles, and its dY columns for ks strips, so blocks start large
  // (packing a few percent of the work) and shrink only until there are two tasks per thread.
  int64_t nb = 256, ks = std::max<int64_t>(1, 256 / W);
  const int64_t strips_total = std::max<int64_t>(1, (K + W - 1) / W);
  auto task_count = [&] { return ((N + nb - 1) / nb) * ((strips_total + ks - 1) / ks); };
  const int64_t target = 2 * (int64_t)num_threads();
  while (task_count() < target) {
    if (nb > 64) nb /= 2;
    else if (ks > 2) ks /= 2;
    else if (nb > 2 * R) nb /= 2;
    else if (ks > 1) ks /= 2;
    else if (nb > R) nb /= 2;
    else break;
  }
  const int64_t kblocks = (strips_total + ks - 1) / ks, tasks = task_count();
  // The packed tiles and strips lie a whole block plus one cache line apart: at a multiple of 4 KiB,
  // as MB rows of R or W values would be, a row's values for every tile (or strip) share one L1 set.
  // (Reading dY and X in place instead, their rows N and K values apart, put a block's rows in a few
  // L1 sets: 58% of the FMA peak against 70% packed, at 4096 × 1024 × 256.)
  constexpr int64_t kPad = 64 / sizeof(T);
  const int64_t tile_stride = R * MB + kPad, strip_stride = W * MB + kPad;
  // Small products stay on one thread.
  const int64_t min_chunk = (double)M * N * std::max<int64_t>(K, 1) < (1 << 20) ? tasks : 1;
  parallel_for(tasks, min_chunk, [&](int64_t begin, int64_t end) {
    AlignedScratch<T> dyp_buf(((nb + R - 1) / R) * tile_stride), xp_buf(ks * strip_stride);
    T* dyp = dyp_buf.data;
    T* xp = xp_buf.data;
    std::vector<double> bsum(dbias ? nb : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = (task / kblocks) * nb, n1 = std::min(N, n0 + nb);
      const int64_t k0 = (task % kblocks) * ks * W, k1 = std::min(K, k0 + ks * W);
      const int64_t nw = n1 - n0, tiles = (nw + R - 1) / R, full = nw / R;
      const int64_t kw = std::max<int64_t>(0, k1 - k0), strips = (kw + W - 1) / W, full_strips = kw / W;
      const int64_t edge = kw - full_strips * W, edge_stride = (edge + L - 1) / L * L;
      const bool with_bias = dbias && task % kblocks == 0;
      if (with_bias) std::fill(bsum.begin(), bsum.begin() + nw, 0.0);
      // With few output rows each X value serves only nw multiply-adds and copying X would cost a large
      // share of them (x_proj's 48 rows: 46% of the peak packed): full strips are read in place, rows K
      // apart (the SIMD tiles take any row stride; the plain one reads packed rows).
      const bool x_in_place = L > 1 && nw <= 64;
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mb = std::min(MB, M - m0);
        // Row by row: dY[m, n0:n1] into the tiles ([tile][m][R], zero-padded to whole tiles) and
        // X[m, k0:k1] into the strips ([strip][m][W]; the last strip [m][its width in whole vectors]).
        for (int64_t m = 0; m < mb; ++m) {
          const T* row = dy + (m0 + m) * N + n0;
          for (int64_t t = 0; t < full; ++t) std::memcpy(dyp + t * tile_stride + m * R, row + t * R, R * sizeof(T));
          if (full < tiles) {
            T* out = dyp + full * tile_stride + m * R;
            for (int64_t r = 0; r < R; ++r) out[r] = full * R + r < nw ? row[full * R + r] : T(0);
          }
          if (with_bias)
            for (int64_t j = 0; j < nw; ++j) bsum[j] += (double)row[j];
          const T* xr = x + (m0 + m) * K + k0;
          for (int64_t s = 0; s < (x_in_place ? 0 : full_strips); ++s)
            std::memcpy(xp + s * strip_stride + m * W, xr + s * W, W * sizeof(T));
          if (edge > 0) {
            T* out = xp + full_strips * strip_stride + m * edge_stride;
            std::memcpy(out, xr + full_strips * W, edge * sizeof(T));
            for (int64_t j = edge; j < edge_stride; ++j) out[j] = T(0);
          }
        }
        auto pair = [&](int64_t t, int64_t s) {
          const int64_t width = std::min(W, kw - s * W);
          const bool in_place = x_in_place && width == W;
          wg_tile<T>((int)((width + L - 1) / L), dyp + t * tile_stride, R,
                     in_place ? x + m0 * K + k0 + s * W : xp + s * strip_stride,
                     in_place ? K : width == W ? W : edge_stride, mb, dw + (n0 + t * R) * K + k0 + s * W, K,
                     (int)std::min(R, nw - t * R), (int)width);
        };
        // When all the task's tiles fit in L1 beside one strip (few output rows, as x_proj's 48), strip
        // by strip; otherwise tile by tile, a tile's dY values staying in L1 while the strips pass from
        // L2 (at 4096 × 1024 × 256: 70% of the FMA peak, strip by strip 61%).
        if (tiles * tile_stride * (int64_t)sizeof(T) <= 24 * 1024) {
          for (int64_t st = 0; st < strips; ++st)
            for (int64_t t = 0; t < tiles; ++t) pair(t, st);
        } else {
          for (int64_t t = 0; t < tiles; ++t)
            for (int64_t st = 0; st < strips; ++st) pair(t, st);
        }
      }
      if (with_bias)
        for (int64_t j = 0; j < nw; ++j) dbias[n0 + j] += (T)bsum[j];
    }
  });
}

// ---- This level's table -------------------------------------------------------------------------------

template <typename T>
constexpr OpsFor<T> ops_for() {
  return {&rmsnorm_forward<T>, &rmsnorm_backward<T>, &gated_rmsnorm_forward<T>, &gated_rmsnorm_backward<T>,
          &conv1d_forward<T>,  &conv1d_backward<T>,  &scan_forward<T>,          &scan_backward<T>,
          &cross_entropy<T>, &transpose<T>,      &weight_grad<T>,           &ssd_forward<T>,
          &ssd_backward<T>};
}

extern const TrainOpsTable ops_table;
const TrainOpsTable ops_table = {ops_for<float>(), ops_for<double>(), &scan_backward_scratch_bytes,
                                 &ssd_backward_scratch_bytes};

}  // namespace mssm::train::MSSM_LEVEL
