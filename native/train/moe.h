// Mixture-of-experts MLP block (BlackMamba's MoE-MLP) for training: forward that keeps what the
// backward needs, and the backward into x and every parameter, with the load-balancing loss.
//
// Glossary:
//   T  tokens            E  experts             k  top_k (experts chosen per token)
//   D  dim (model width) H  hidden (each expert's GLU width; fc1 produces 2·H)
//   pair (t, slot): token t's slot-th chosen expert; a "row" is a pair in the grouped-by-expert order
//
// Forward (the same equations as cpu::moe_route + cpu::moe_experts, cpu/kernels.h):
//   logits_t = W_router · x_t (+ b_router)                                   [E]
//   p_t      = softmax(logits_t) or sigmoid(logits_t)                       [E]   (MoeScoring)
//   chosen   = the k largest of p_t (ties: lower index first)
//   w_t,j    = p_t[chosen_j]  (/ Σ_j p_t[chosen_j] when renormalize)
//   h = fc1[e]·x_t (+ b1[e]);  a, b = h[:H], h[H:];  g = act(a) ⊙ b;  o = fc2[e]·g (+ b2[e])
//   out_t    = Σ_j w_t,j · o(t, j)
// Load-balancing loss (Switch Transformer, eq. 4; BlackMamba's router loss):
//   aux = E · Σ_e f_e · P_e,   f_e = #pairs routed to e / (T·k)  (a count: no gradient)
//                              P_e = (1/T) Σ_t p_t[e]             (gradient flows to all logits)
// Backward: the top-k choice is held fixed; gradients reach the router through the chosen weights
// (and the renormalisation) and through P_e, then through softmax / sigmoid to every logit.
// Total loss seen by the backward: main + aux_weight · aux.
//
// top_k > experts: as the inference kernel, the slots beyond E carry no weight; here their index is
// -1 and they are not routed anywhere (f_e then divides by T·min(k, E)).
//
// Threads: every sum runs in a fixed order and every parallel_for writes disjoint outputs, so the
// results are bit-identical at any thread count.
#pragma once
#include <cstdint>
#include <vector>

#include "../cpu/kernels.h"

namespace mssm::train {

template <typename T>
struct MoeParams {
  const T* router = nullptr;       // [E, D]
  const T* router_bias = nullptr;  // [E] or null
  const T* fc1 = nullptr;          // [E, 2·H, D]
  const T* fc1_bias = nullptr;     // [E, 2·H] or null
  const T* fc2 = nullptr;          // [E, D, H]
  const T* fc2_bias = nullptr;     // [E, D] or null
};

// Gradients, accumulated (+=) so several micro-batches can add into one buffer. A pointer may be
// null exactly where the matching parameter is null (and may be null otherwise to skip that tensor).
template <typename T>
struct MoeParamGrads {
  T* router = nullptr;
  T* router_bias = nullptr;
  T* fc1 = nullptr;
  T* fc1_bias = nullptr;
  T* fc2 = nullptr;
  T* fc2_bias = nullptr;
};

struct MoeShape {
  int64_t tokens = 0, dim = 0, hidden = 0, experts = 0, top_k = 1;
  cpu::MoeScoring scoring = cpu::MoeScoring::softmax;
  bool renormalize = true;
  cpu::Activation activation = cpu::Activation::silu;
};

// What the forward keeps for the backward: the routing (so the backward never routes again) and the
// fc1 outputs h (pre-activation, bias included). h is saved, not recomputed: recomputing it would
// cost the fc1 matmul again (2·H·D multiply-adds per pair, two thirds of the experts' forward FLOPs),
// while g = act(a) ⊙ b is recomputed from h (elementwise) and the expert outputs o are never needed
// (∂L/∂w = (fc2ᵀ·dout)·g + dout·b2, and fc2ᵀ·dout is needed anyway). bytes() reports the size:
//   T·k·(2·H·sizeof(T) + sizeof(T) + 4 + 16) + T·E·sizeof(T) + 8·(E + 1) + 4·E
// i.e. about 2·H·sizeof(T) per routed pair: with f32, D 1536, H 4096, k 2, T 2048 that is 128 MiB
// per MoE layer (the test prints the measured size of its case). The backward also allocates
// transient scratch of T·k·D (the per-pair dx rows) plus one expert's rows × (2·D + 4·H), and
// (in float) a transposed copy of the largest weight it multiplies by, 2·H·D.
template <typename T>
struct MoeSaved {
  std::vector<int32_t> indices;  // [T, k] chosen experts (-1 beyond E)
  std::vector<T> weights;        // [T, k] combine weights (after renormalisation)
  std::vector<T> scores;         // [T, E] full router scores p (softmax / sigmoid)
  std::vector<int32_t> counts;   // [E] pairs routed to each expert
  std::vector<int64_t> offsets;  // [E + 1] first row of each expert in the grouped order
  std::vector<int64_t> pair;     // [rows] row -> t·k + slot
  std::vector<int64_t> row;      // [T·k] t·k + slot -> row, or -1
  std::vector<T> hidden;         // [rows, 2·H] fc1 outputs h of each row
  size_t bytes() const;
};

// out [T, D] (=). saved: filled when not null (its vectors are resized). aux_loss: set when not null
// (computed in double).
template <typename T>
void moe_forward(const MoeShape& shape, const MoeParams<T>& params, const T* x, T* out, MoeSaved<T>* saved,
                 double* aux_loss);

// dout [T, D]: ∂L/∂out. dx [T, D] (=). grads (+=). aux_weight scales the load-balancing loss's
// gradient (0: none). x and params must be those the forward that filled saved was given.
template <typename T>
void moe_backward(const MoeShape& shape, const MoeParams<T>& params, const T* x, const MoeSaved<T>& saved,
                  const T* dout, T aux_weight, T* dx, const MoeParamGrads<T>& grads);

}  // namespace mssm::train
