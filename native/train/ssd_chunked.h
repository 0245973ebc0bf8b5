// Mamba-2's scan in its chunked state-space-duality (SSD) form, forward and backward, for training:
// the same computation as scan_forward / scan_backward of ops.h with each head's dt, A, D and dt_bias
// repeated over its P channels (and A over the states), but with the work inside a chunk done as small
// matrix products instead of a token-by-token recurrence. T = float (training) or double (gradient
// checks); compiled once per CPU level like ops.cpp (see ops_table.h).
//
// Glossary: b batch, t token (length L), h head (heads = H), p channel of a head (head_dim = P),
//   n state index (state = N), g group of B/C (groups = G; head h reads group g(h) = h / (H/G)),
//   Q chunk (tokens per chunk), i, j tokens inside a chunk (i: output, j: input, j ≤ i).
//
// Per batch and head:
//   dt[t,h] = softplus(dt_raw[t,h] + dt_bias[h]) when softplus (softplus(v) = v for v > 20), else
//             dt_raw + dt_bias;  then clamp(dt, dt_min, dt_max)  (gradient 0 through a clamped value)
//   s_t[h,p,n] = exp(dt[t,h]·A[h])·s_{t-1}[h,p,n] + dt[t,h]·x[t,h,p]·B[t,g,n],   s_{-1} = 0
//   y[t,h,p]   = Σ_n s_t[h,p,n]·C[t,g,n] + D[h]·x[t,h,p]
// computed chunk by chunk (cs_i = Σ_{k≤i} dt_k·A inside the chunk, S the state at the chunk's start):
//   y_i   = Σ_{j≤i} exp(cs_i − cs_j)·(C_i·B_j)·dt_j·x_j + exp(cs_i)·S·C_i + D·x_i
//   S_end = exp(cs_last)·S + Σ_j exp(cs_last − cs_j)·dt_j·x_j ⊗ B_j
//
// The forward keeps only the state at the start of each chunk,
//   boundary [batch][ceil(length/chunk)][heads][head_dim][state]   (chunk 0's entry is zeros)
// (the layout scan_forward gives for the expanded channels h·P + p), and the backward recomputes each
// chunk from it, walking the chunks last to first with the state's adjoint carried between them:
// nothing of size length·H·P·N is ever allocated. Outputs marked (=) are overwritten, (+=) are
// accumulated into (the caller zeroes them); "or null" pointers may be null; no output may overlap an
// input. Every result is bit-identical at any number of threads. heads % groups != 0, chunk < 1 or a negative size throws
// std::invalid_argument naming the field, before anything is written.
#pragma once
#include <cmath>
#include <cstdint>

namespace mssm::train {

struct SsdTrainArgs {
  int64_t batch = 1, length = 1, heads = 0, head_dim = 0, state = 0, groups = 1, chunk = 64;
  bool softplus = true;
  double dt_min = 0.0, dt_max = INFINITY;
};

template <typename T>
struct SsdTrainTensors {
  const T* x = nullptr;        // [batch, length, heads, head_dim]
  const T* dt = nullptr;       // [batch, length, heads]  (raw: before dt_bias, softplus and the clamp)
  const T* A = nullptr;        // [heads]  (negative)
  const T* B = nullptr;        // [batch, length, groups, state]
  const T* C = nullptr;        // [batch, length, groups, state]
  const T* D = nullptr;        // [heads] or null
  const T* dt_bias = nullptr;  // [heads] or null
};

// y (=) [batch, length, heads, head_dim]; boundary (=) as above.
template <typename T>
void ssd_forward(const SsdTrainArgs& a, const SsdTrainTensors<T>& t, T* y, T* boundary);

template <typename T>
struct SsdTrainGrads {
  T* dx = nullptr;        // (=) [batch, length, heads, head_dim]
  T* ddt = nullptr;       // (=) [batch, length, heads], with respect to the raw dt
  T* dA = nullptr;        // (+=) [heads]
  T* dB = nullptr;        // (=) [batch, length, groups, state]
  T* dC = nullptr;        // (=) [batch, length, groups, state]
  T* dD = nullptr;        // (+=) [heads], or null (ignored when D is null)
  T* ddt_bias = nullptr;  // (+=) [heads], or null (ignored when dt_bias is null)
};

// dy [batch, length, heads, head_dim]; boundary as written by ssd_forward with the same args and tensors.
template <typename T>
void ssd_backward(const SsdTrainArgs& a, const SsdTrainTensors<T>& t, const T* boundary, const T* dy,
                  const SsdTrainGrads<T>& g);

// Bytes of scratch one ssd_backward call with T = float uses on num_threads() threads (T = double: twice
// as many), with Q = min(chunk, length) and rows padded to whole SIMD vectors: per thread, one chunk's
// recomputed operands for a group and one head, about Q·(5Q + 7N + 5P) + 2·P·N values (C·Bᵀ, its
// adjoint, the decays and M, dM; B, C, Bᵀ and the dB / dC terms; dt·x, its transpose, dy, dy·exp(cs),
// dxd; the start state and dSᵀ); shared, the carried state adjoint (batch · H · P · N), per-head
// partials of dA, dD and dt_bias (3 · batch · H doubles) and, when a group's heads are split over
// several tasks, their dB / dC of one chunk (2 · batch · G · blocks · Q · N). For a fixed chunk nothing
// in it grows with length. The scratch is kept by the calling thread from call to call (grown when a
// call needs more), so steady training allocates nothing; the forward uses less. The boundary states
// of the forward are the caller's: batch · ⌈length/chunk⌉ · H · P · N values.
int64_t ssd_backward_scratch_bytes(const SsdTrainArgs& a);

}  // namespace mssm::train
