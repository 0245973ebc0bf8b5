// The forward and backward of each op a Mamba model is trained through, as plain functions over
// contiguous row-major tensors, for T = float (training) and T = double (gradient checks).
//
// The forwards compute what the inference kernels of native/cpu/kernels.h compute (same equations,
// same softplus threshold), and save what their backward needs: rstd for the norms, the chunk-boundary
// states for the scan. Outputs marked (=) are overwritten, (+=) are accumulated into (the caller
// zeroes them); a pointer marked "or null" may be null. Every result is independent of the number of
// threads: parameter gradients are reduced in a fixed order, never by racing threads.
// For T = float the exponentials of the hot loops (decay, silu, softmax) use a polynomial accurate to
// about 2 ulp (so loops over them vectorise); T = double uses std::exp.
//
// Glossary: rows  independent vectors (tokens);  dim  features per row;
//   b batch, t token (length L), c / d channel (channels = D), n state index (state = N),
//   g group of B/C (groups = G), k tap of the causal conv (kernel = K), Δ = delta.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

namespace mssm::train {

// ---- RMSNorm ----------------------------------------------------------------------------------
// out[r] = x[r] · rstd[r] ⊙ w,  rstd[r] = 1/sqrt(mean(x[r]²) + eps).
// x, out [rows, dim]; w [dim]; rstd [rows] (=, saved for the backward).
template <typename T>
void rmsnorm_forward(const T* x, const T* w, T* out, T* rstd, int64_t rows, int64_t dim, T eps);
// dx (+=) [rows, dim] (the residual stream's gradient, so accumulated); dw (+=) [dim].
template <typename T>
void rmsnorm_backward(const T* dout, const T* x, const T* w, const T* rstd, T* dx, T* dw, int64_t rows, int64_t dim);

// ---- Gated RMSNorm (Mamba-2) --------------------------------------------------------------------
// Over groups of group_size features within each row (dim % group_size == 0):
//   norm_before_gate false: out = rmsnorm_group(y ⊙ silu(z)) · w
//   norm_before_gate true:  out = rmsnorm_group(y) · w ⊙ silu(z)
// y, z, out [rows, dim]; w [dim]; rstd [rows, dim / group_size] (=, saved). z is never null here.
template <typename T>
void gated_rmsnorm_forward(const T* y, const T* z, const T* w, T* out, T* rstd, int64_t rows, int64_t dim,
                           int64_t group_size, T eps, bool norm_before_gate);
// dy (=), dz (=) [rows, dim]; dw (+=) [dim].
template <typename T>
void gated_rmsnorm_backward(const T* dout, const T* y, const T* z, const T* w, const T* rstd, T* dy, T* dz, T* dw,
                            int64_t rows, int64_t dim, int64_t group_size, bool norm_before_gate);

// ---- Causal depthwise conv1d ------------------------------------------------------------------
// Channels last, from a zero initial state:
//   y[b,t,c] = act(bias[c] + Σ_k w[c,k] · x[b, t+k-(K-1), c])   (x before t = 0 is 0)
// act = silu when silu, else identity. x, y [batch, length, channels]; w [channels, kernel];
// bias [channels] or null. y must not alias x.
template <typename T>
void conv1d_forward(const T* x, const T* w, const T* bias, T* y, int64_t batch, int64_t length, int64_t channels,
                    int64_t kernel, bool silu);
// dx (=) [batch, length, channels]; dw (+=) [channels, kernel]; dbias (+=) [channels], or null (it must
// be null when bias is). Recomputes the pre-activation; allocates nothing per token.
template <typename T>
void conv1d_backward(const T* dy, const T* x, const T* w, const T* bias, T* dx, T* dw, T* dbias, int64_t batch,
                     int64_t length, int64_t channels, int64_t kernel, bool silu);

// ---- Selective scan (S6) with the paper's recomputation ------------------------------------------
// Per channel d of group g(d) = d / (channels / groups), state index n:
//   dt = softplus(Δ + delta_bias) when softplus (softplus(v) = v for v > 20, else log1p(exp(v))),
//        else Δ + delta_bias;  then dt = clamp(dt, dt_min, dt_max)  (gradient 0 through a clamped value)
//   s_t[d,n] = exp(dt[t,d]·A[d,n]) · s_{t-1}[d,n] + dt[t,d]·u[t,d]·B[t,g(d),n],   s_{-1} = 0
//   yc[t,d]  = Σ_n s_t[d,n]·C[t,g(d),n] + D[d]·u[t,d];   y = yc · silu(z[t,d]) when z is given, else yc
// The forward keeps only the state at the start of each chunk of `chunk` tokens:
//   boundary [batch][ceil(length/chunk)][channels][state]   (chunk 0's entry is zeros)
// and the backward recomputes the states inside one chunk at a time from it, walking the chunks last
// to first with the state's adjoint carried between them: O(length/chunk · D · N) memory, never
// O(length · D · N). channels % groups == 0 and chunk >= 1, else std::invalid_argument.
struct ScanArgs {
  int64_t batch = 1, length = 1, channels = 0, state = 0, groups = 1, chunk = 64;
  bool softplus = true;
  double dt_min = 0.0, dt_max = INFINITY;
};
template <typename T>
struct ScanTensors {
  const T* u = nullptr;           // [batch, length, channels]
  const T* delta = nullptr;       // [batch, length, channels]  (before bias and softplus)
  const T* A = nullptr;           // [channels, state]  (negative)
  const T* B = nullptr;           // [batch, length, groups, state]
  const T* C = nullptr;           // [batch, length, groups, state]
  const T* D = nullptr;           // [channels] or null
  const T* z = nullptr;           // [batch, length, channels] or null
  const T* delta_bias = nullptr;  // [channels] or null
};
// y (=) [batch, length, channels]; boundary (=) as above.
template <typename T>
void scan_forward(const ScanArgs& a, const ScanTensors<T>& t, T* y, T* boundary);
template <typename T>
struct ScanGrads {
  T* du = nullptr;           // (=) [batch, length, channels]
  T* ddelta = nullptr;       // (=) [batch, length, channels]
  T* dA = nullptr;           // (+=) [channels, state]
  T* dB = nullptr;           // (=) [batch, length, groups, state]
  T* dC = nullptr;           // (=) [batch, length, groups, state]
  T* dD = nullptr;           // (+=) [channels], or null when D is null
  T* dz = nullptr;           // (=) [batch, length, channels], or null when z is null
  T* ddelta_bias = nullptr;  // (+=) [channels], or null when delta_bias is null
};
// dy [batch, length, channels]; boundary as written by scan_forward with the same args and tensors.
template <typename T>
void scan_backward(const ScanArgs& a, const ScanTensors<T>& t, const T* boundary, const T* dy, const ScanGrads<T>& g);
// Bytes one scan_backward call with T = float allocates, all together, on num_threads() threads (T =
// double: twice as many), with Q = min(chunk, length): per thread Q · 16 · (2·N + 3) + 5 · 16 · N values
// (the recomputed states and decays of one block of 16 channels, its dt, d dt/dΔ and yc, and the block's A, A scaled for the decay's exp, start state, state adjoint and dA in lanes
// of 16 channels); shared, 2 · batch · D · N (the carried state adjoint and per-batch dA partials)
// + 2 · batch · D (per-batch dD and delta_bias partials) + 2 · batch · G·⌈D/(16·G)⌉ · Q · N (dB / dC
// partials of one chunk). For a fixed chunk nothing in it grows with length. The boundary states of
// the forward are the caller's: batch · ⌈length/chunk⌉ · D · N values.
int64_t scan_backward_scratch_bytes(const ScanArgs& a);

// ---- Softmax cross-entropy ------------------------------------------------------------------------
// In place over rows of logits [rows, vocab]: returns Σ over rows with target >= 0 of
// -log softmax(logits[r])[target[r]] (as double), and replaces logits[r] by
// scale · (softmax(logits[r]) − onehot(target[r])); rows with target < 0 become zeros and add no loss.
// *count (if not null) += the number of rows with target >= 0. A target >= vocab throws
// std::out_of_range naming the row and value, before any logit is changed.
template <typename T>
double cross_entropy(T* logits, const int32_t* targets, int64_t rows, int64_t vocab, T scale, int64_t* count);

// ---- Transpose --------------------------------------------------------------------------------------
// dst[c, r] = src[r, c] for src [rows, cols] (the weight gradients' products read both operands with
// the token index innermost). dst must not overlap src.
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst);

// ---- Linear layer ------------------------------------------------------------------------------------
// y [M,N] (=) = x [M,K]·W[N,K]ᵀ (+ bias [N], or null).
void linear(const float* x, const float* W, const float* bias, float* y, int64_t M, int64_t N, int64_t K);
void linear(const double* x, const double* W, const double* bias, double* y, int64_t M, int64_t N, int64_t K);
// dx [M,K] = dy [M,N]·W [N,K] (=), or += when accumulate. scratch: grown to hold Wᵀ (and, when
// accumulating, the product) in float; unused in double. Kept by the caller between calls.
void linear_input_grad(const float* dy, const float* W, float* dx, int64_t M, int64_t N, int64_t K, bool accumulate,
                       std::vector<float>& scratch);
void linear_input_grad(const double* dy, const double* W, double* dx, int64_t M, int64_t N, int64_t K,
                       bool accumulate, std::vector<double>& scratch);

// ---- Weight gradient ----------------------------------------------------------------------------------
// The weight gradient of a linear layer y = x·Wᵀ, without transposing either operand:
//   dw[n,k] += Σ_m dy[m,n] · x[m,k],   dbias[n] += Σ_m dy[m,n]   (when dbias is not null)
// dy [M,N], x [M,K]; dw (+=) [N,K], or null for dbias alone (x is then not read); dbias (+=) [N] or
// null. The sum over m is taken in float over fixed blocks of rows, each block's sum added to dw in
// order (dbias: in double over all rows), so the result is the same at any thread count. dw must not
// overlap dy or x.
template <typename T>
void weight_grad(const T* dy, const T* x, T* dw, T* dbias, int64_t M, int64_t N, int64_t K);

}  // namespace mssm::train
