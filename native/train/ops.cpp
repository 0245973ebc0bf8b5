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
// are no reassociation flags, so sums are written over kLanes (or kScanLanes) independent partial sums
// that the compiler can keep in SIMD registers; for T = float the exponential is a branch-free
// polynomial (exp_fast) for the same reason.
#include "../cpu/level.h"
#include "ops_table.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/exp_poly.h"
#include "../core/threadpool.h"

namespace mssm::train::MSSM_LEVEL {
namespace {

constexpr int kLanes = 16;
// Row sums are taken in T lanes over blocks of kSumBlock values and the block sums in double.
constexpr int64_t kSumBlock = 512;
// Values per parallel task below which a loop stays on one thread.
constexpr int64_t kMinValuesPerTask = 1 << 14;
// Channels per scan / conv task and columns per weight-gradient task: fixed, so that the partial sums
// of a parameter gradient are the same whatever the thread count.
constexpr int64_t kScanBlock = 16;
constexpr int64_t kConvBlock = 16;
constexpr int64_t kColumnBlock = 64;
// Lanes of the scan's sums over the state index (N is usually 16).
constexpr int kScanLanes = 8;

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

// Σ a[n]·b[n] over the state index.
template <typename T>
inline T state_dot(const T* a, const T* b, int64_t n_total) {
  T lanes[kScanLanes] = {};
  int64_t n = 0;
  for (; n + kScanLanes <= n_total; n += kScanLanes)
    for (int q = 0; q < kScanLanes; ++q) lanes[q] += a[n + q] * b[n + q];
  for (; n < n_total; ++n) lanes[0] += a[n] * b[n];
  T sum = 0;
  for (int q = 0; q < kScanLanes; ++q) sum += lanes[q];
  return sum;
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
// dbias = Σ g. One task owns a block of kConvBlock channels for every batch and token, and walks the
// tokens backwards keeping the last K rows of g in a ring, so dx[t] can be formed as soon as g[t] is.
template <typename T>
void conv1d_backward(const T* dy, const T* x, const T* w, const T* bias, T* dx, T* dw, T* dbias, int64_t batch,
                     int64_t length, int64_t channels, int64_t kernel, bool silu_act) {
  constexpr int64_t W = kConvBlock;
  const int64_t blocks = (channels + W - 1) / W;
  parallel_for(blocks, min_tasks(W * batch * length * kernel), [&](int64_t begin, int64_t end) {
    std::vector<T> taps(kernel * W), ring(kernel * W);
    std::vector<double> dw_acc(kernel * W);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * W, width = std::min(W, channels - c0);
      std::fill(taps.begin(), taps.end(), T(0));
      for (int64_t j = 0; j < width; ++j)
        for (int64_t k = 0; k < kernel; ++k) taps[k * W + j] = w[(c0 + j) * kernel + k];
      std::fill(dw_acc.begin(), dw_acc.end(), 0.0);
      double db_acc[W] = {};
      for (int64_t b = 0; b < batch; ++b) {
        std::fill(ring.begin(), ring.end(), T(0));
        for (int64_t t = length - 1; t >= 0; --t) {
          const int64_t row = b * length + t;
          T* g = ring.data() + (t % kernel) * W;
          T pre[W];
          for (int64_t j = 0; j < width; ++j) pre[j] = bias ? bias[c0 + j] : T(0);
          for (int64_t k = 0; k < kernel; ++k) {
            const int64_t back = kernel - 1 - k;
            if (back > t) continue;
            const T* xr = x + (row - back) * channels + c0;
            for (int64_t j = 0; j < width; ++j) pre[j] += taps[k * W + j] * xr[j];
          }
          const T* dyr = dy + row * channels + c0;
          for (int64_t j = 0; j < width; ++j) g[j] = silu_act ? dyr[j] * silu_grad(pre[j]) : dyr[j];
          for (int64_t j = 0; j < width; ++j) db_acc[j] += (double)g[j];
          for (int64_t k = 0; k < kernel; ++k) {
            const int64_t back = kernel - 1 - k;
            if (back > t) continue;
            const T* xr = x + (row - back) * channels + c0;
            for (int64_t j = 0; j < width; ++j) dw_acc[k * W + j] += (double)(g[j] * xr[j]);
          }
          T* dxr = dx + row * channels + c0;
          for (int64_t j = 0; j < width; ++j) dxr[j] = T(0);
          for (int64_t m = 0; m < kernel && t + m < length; ++m) {
            const T* gm = ring.data() + ((t + m) % kernel) * W;
            const T* wk = taps.data() + (kernel - 1 - m) * W;
            for (int64_t j = 0; j < width; ++j) dxr[j] += wk[j] * gm[j];
          }
        }
      }
      for (int64_t j = 0; j < width; ++j)
        for (int64_t k = 0; k < kernel; ++k) dw[(c0 + j) * kernel + k] += (T)dw_acc[k * W + j];
      if (dbias)
        for (int64_t j = 0; j < width; ++j) dbias[c0 + j] += (T)db_acc[j];
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

// softplus(v) for v ≤ 20 and its derivative σ(v), branch-free so that a row of them vectorises:
// with e = exp(−|v|) ∈ (0, 1], softplus = max(v, 0) + log1p(e) and log1p(e) = 2·atanh(s) = 2s·(1 + x·q(x)),
// s = e / (2 + e), x = s², q the minimax quartic of native/cpu/selective_scan.cpp (relative error
// below 3e-10, far under float rounding). T = double uses the library functions.
inline void softplus_and_sigmoid(float v, float* value, float* slope) {
  const float e = exp_fast(-std::fabs(v));
  const float s = e / (2.0f + e), x = s * s;
  float q = 0.1220460832f * x + 0.1070559844f;
  q = q * x + 0.1430843920f;
  q = q * x + 0.1999947727f;
  q = q * x + 0.3333333731f;
  *value = std::max(v, 0.0f) + 2.0f * s * (1.0f + x * q);
  const float r = 1.0f / (1.0f + e);
  *slope = v >= 0.0f ? r : e * r;
}
inline void softplus_and_sigmoid(double v, double* value, double* slope) {
  *value = std::log1p(std::exp(v));
  *slope = 1.0 / (1.0 + std::exp(-v));
}

// dt from Δ + delta_bias for `count` neighbouring channels of one token, and d dt / dΔ (0 where
// clamped; 1 on softplus's v > 20 branch, where softplus(v) = v).
template <typename T>
struct DtRule {
  bool softplus;
  T lo, hi;
  void row(const T* delta, const T* bias, int64_t count, T* dt, T* grad) const {
    for (int64_t j = 0; j < count; ++j) {
      const T v = delta[j] + (bias ? bias[j] : T(0));
      T value = v, slope = T(1);
      if (softplus) {
        T sp, sg;
        softplus_and_sigmoid(v, &sp, &sg);
        value = v > T(20) ? v : sp;
        slope = v > T(20) ? T(1) : sg;
      }
      const bool clamped = value < lo || value > hi;
      dt[j] = value < lo ? lo : (value > hi ? hi : value);
      grad[j] = clamped ? T(0) : slope;
    }
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

// Per-thread values of the backward's recomputation: states and decays [chunk][kScanBlock][N], dt,
// its derivative and yc [chunk][kScanBlock].
int64_t scan_thread_values(const ScanArgs& a, const ScanLayout& l) {
  return l.chunk_rows * kScanBlock * (2 * a.state + 3);
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
    std::vector<T> states(kScanBlock * N);
    T dts[kScanBlock], slopes[kScanBlock], gates[kScanBlock], gate_slopes[kScanBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / l.blocks;
      int64_t g, d0, count;
      l.block(task % l.blocks, &g, &d0, &count);
      std::fill(states.begin(), states.end(), T(0));
      for (int64_t t = 0; t < L; ++t) {
        if (t % a.chunk == 0)
          std::memcpy(boundary + ((b * l.chunks + t / a.chunk) * D + d0) * N, states.data(), count * N * sizeof(T));
        const int64_t row = b * L + t;
        const T* Bt = in.B + (row * G + g) * N;
        const T* Ct = in.C + (row * G + g) * N;
        const int64_t i0 = row * D + d0;
        rule.row(in.delta + i0, in.delta_bias ? in.delta_bias + d0 : nullptr, count, dts, slopes);
        if (in.z) gate_row(in.z + i0, count, gates, gate_slopes);
        for (int64_t j = 0; j < count; ++j) {
          const int64_t d = d0 + j, i = i0 + j;
          const T dt = dts[j], u = in.u[i], dtu = dt * u;
          const T* Ad = in.A + d * N;
          T* s = states.data() + j * N;
          for (int64_t n = 0; n < N; ++n) s[n] = exp_fast(dt * Ad[n]) * s[n] + dtu * Bt[n];
          const T yc = state_dot(s, Ct, N) + (in.D ? in.D[d] * u : T(0));
          y[i] = in.z ? yc * gates[j] : yc;
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
// The block's dB / dC contributions go to a per-block partial of the chunk, which is then summed over
// the blocks of each group in block order; dA, dD and ddelta_bias are summed per batch, then over
// batches in order.
template <typename T>
void scan_backward(const ScanArgs& a, const ScanTensors<T>& in, const T* boundary, const T* dy, const ScanGrads<T>& out) {
  const ScanLayout l(a);
  const int64_t L = a.length, D = a.channels, N = a.state, G = a.groups, Q = l.chunk_rows;
  const DtRule<T> rule{a.softplus, (T)a.dt_min, (T)a.dt_max};
  const int threads = num_threads();
  const int64_t per_thread = scan_thread_values(a, l);
  std::vector<T> scratch(per_thread * threads);
  std::vector<T> carry(a.batch * D * N, T(0)), dA_part(a.batch * D * N, T(0));
  std::vector<T> dD_part(a.batch * D, T(0)), bias_part(a.batch * D, T(0));
  std::vector<T> dB_part(a.batch * l.blocks * Q * N), dC_part(a.batch * l.blocks * Q * N);
  std::vector<T> fallback;  // only if the pool grew since `threads` was read

  for (int64_t c = l.chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * a.chunk, len = std::min(a.chunk, L - t0);
    parallel_for(a.batch * l.blocks, [&](int64_t begin, int64_t end) {
      const int slot = thread_index();
      std::vector<T> own;
      T* work;
      if (slot < threads) {
        work = scratch.data() + slot * per_thread;
      } else {
        own.resize(per_thread);
        work = own.data();
      }
      T* S = work;                                // s_t
      T* dec = S + Q * kScanBlock * N;            // a_t = exp(dt·A)
      T* dts = dec + Q * kScanBlock * N;          // dt
      T* dgrad = dts + Q * kScanBlock;            // d dt / dΔ
      T* ycs = dgrad + Q * kScanBlock;            // yc (for dz)
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / l.blocks, blk = task % l.blocks;
        int64_t g, d0, count;
        l.block(blk, &g, &d0, &count);
        const T* s_start = boundary + ((b * l.chunks + c) * D + d0) * N;

        // Recompute the chunk's states exactly as the forward did.
        for (int64_t tl = 0; tl < len; ++tl) {
          const int64_t row = b * L + t0 + tl;
          const T* Bt = in.B + (row * G + g) * N;
          const T* Ct = in.C + (row * G + g) * N;
          const int64_t i0 = row * D + d0;
          rule.row(in.delta + i0, in.delta_bias ? in.delta_bias + d0 : nullptr, count, dts + tl * kScanBlock,
                   dgrad + tl * kScanBlock);
          for (int64_t j = 0; j < count; ++j) {
            const int64_t d = d0 + j, i = i0 + j, at = tl * kScanBlock + j;
            const T dt = dts[at];
            const T u = in.u[i], dtu = dt * u;
            const T* Ad = in.A + d * N;
            const T* sp = tl ? S + (at - kScanBlock) * N : s_start + j * N;
            T* s = S + at * N;
            T* ad = dec + at * N;
            for (int64_t n = 0; n < N; ++n) {
              ad[n] = exp_fast(dt * Ad[n]);
              s[n] = ad[n] * sp[n] + dtu * Bt[n];
            }
            if (in.z) ycs[at] = state_dot(s, Ct, N) + (in.D ? in.D[d] * u : T(0));
          }
        }

        // Walk the chunk backwards.
        T* pB = dB_part.data() + (b * l.blocks + blk) * Q * N;
        T* pC = dC_part.data() + (b * l.blocks + blk) * Q * N;
        std::fill(pB, pB + len * N, T(0));
        std::fill(pC, pC + len * N, T(0));
        for (int64_t tl = len - 1; tl >= 0; --tl) {
          const int64_t row = b * L + t0 + tl;
          const T* Bt = in.B + (row * G + g) * N;
          const T* Ct = in.C + (row * G + g) * N;
          T* pBt = pB + tl * N;
          T* pCt = pC + tl * N;
          T gates[kScanBlock], gate_slopes[kScanBlock];
          if (in.z) gate_row(in.z + row * D + d0, count, gates, gate_slopes);
          for (int64_t j = 0; j < count; ++j) {
            const int64_t d = d0 + j, i = row * D + d, at = tl * kScanBlock + j;
            const T dt = dts[at], u = in.u[i], dtu = dt * u;
            T dyc = dy[i];
            if (in.z) {
              out.dz[i] = dy[i] * ycs[at] * gate_slopes[j];
              dyc = dy[i] * gates[j];
            }
            const T* Ad = in.A + d * N;
            const T* s = S + at * N;
            const T* sp = tl ? S + (at - kScanBlock) * N : s_start + j * N;
            const T* ad = dec + at * N;
            T* ds = carry.data() + (b * D + d) * N;
            T* dAd = dA_part.data() + (b * D + d) * N;
            for (int64_t n = 0; n < N; ++n) {
              ds[n] += dyc * Ct[n];
              pCt[n] += dyc * s[n];
            }
            T lane_a[kScanLanes] = {}, lane_b[kScanLanes] = {};
            auto step = [&](int64_t n, T& sum_a, T& sum_b) {
              const T da = ds[n] * sp[n] * ad[n];
              dAd[n] += da * dt;
              sum_a += da * Ad[n];
              sum_b += ds[n] * Bt[n];
              pBt[n] += ds[n] * dtu;
              ds[n] *= ad[n];
            };
            int64_t n = 0;
            for (; n + kScanLanes <= N; n += kScanLanes)
              for (int q = 0; q < kScanLanes; ++q) step(n + q, lane_a[q], lane_b[q]);
            for (; n < N; ++n) step(n, lane_a[0], lane_b[0]);
            T sum_a = 0, sum_b = 0;
            for (int q = 0; q < kScanLanes; ++q) {
              sum_a += lane_a[q];
              sum_b += lane_b[q];
            }
            out.du[i] = dt * sum_b + (in.D ? in.D[d] * dyc : T(0));
            const T ddelta = (sum_a + u * sum_b) * dgrad[at];
            out.ddelta[i] = ddelta;
            if (in.D) dD_part[b * D + d] += dyc * u;
            bias_part[b * D + d] += ddelta;
          }
        }
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

// ---- This level's table -------------------------------------------------------------------------------

template <typename T>
constexpr OpsFor<T> ops_for() {
  return {&rmsnorm_forward<T>, &rmsnorm_backward<T>, &gated_rmsnorm_forward<T>, &gated_rmsnorm_backward<T>,
          &conv1d_forward<T>,  &conv1d_backward<T>,  &scan_forward<T>,          &scan_backward<T>,
          &cross_entropy<T>};
}

extern const TrainOpsTable ops_table;
const TrainOpsTable ops_table = {ops_for<float>(), ops_for<double>(), &scan_backward_scratch_bytes};

}  // namespace mssm::train::MSSM_LEVEL
