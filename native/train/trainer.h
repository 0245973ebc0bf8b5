// Training a Mamba-1 / Mamba-2 language model, with or without mixture-of-experts MLP blocks: the whole
// model's forward and backward in one call per micro-batch, gradients accumulated in the precision T
// (float for training, double for the gradient checks of the tests), and the AdamW update.
//
// The model is the one of native/model/mamba_model.h (same equations, residual order and canonical
// weight names), with one difference in the parameters: A is learnt through its logarithm, as the
// reference does, so the parameter "layers.{i}.A_log" replaces "layers.{i}.A" (A = -exp(A_log)).
// Every parameter lives in one allocation, the gradients in another of the same layout.
//
// Memory. The forward keeps, per layer and token, the activations the backward reads (the layer's
// input, the projections' inputs, the conv and scan inputs, the scan output: about d + 7·di floats for
// Mamba-1), and of the scan's states only those at the start of every chunk of `scan_chunk` tokens;
// the backward recomputes the states inside a chunk from its first one (the paper's recomputation;
// Mamba-2 runs its scan in the chunked SSD form of ssd_chunked.h, those chunks being its SSD chunks).
// So memory grows linearly with the tokens of a micro-batch, at activation_floats_per_token() +
// working_floats_per_token() floats a token plus the boundary states, and the per-step states
// [length, d_inner, N] never exist.
//
// MoE blocks (config.moe) run moe.h's forward and backward; each adds its load-balancing loss, over the
// micro-batch's tokens, to the objective with the weight aux_weight (see forward_backward).
//
// Glossary: B batch (sequences of a micro-batch), L length (tokens per sequence), rows = B·L;
// the model sizes d, di, N, K, R, H, P, G of mamba_model.h.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../model/mamba_model.h"

namespace mssm::train {

// One parameter tensor inside the trainer's single allocation.
struct ParamSlot {
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0, count = 0;
  // AdamW's decoupled weight decay applies (matrices — the MoE router and experts too — and the conv;
  // never norms, biases, A_log, D, dt_bias).
  bool decay = false;
};

// The parameters of `config` in the trainer's order: expected_weights() with A replaced by A_log.
std::vector<ParamSlot> parameter_slots(const model::Config& config);

// Result of one micro-batch.
struct BatchLoss {
  double sum = 0;     // Σ of the token losses (nats)
  int64_t count = 0;  // tokens with a target (target >= 0)
  double aux = 0;     // Σ over the MoE blocks of their load-balancing losses (0 without MoE blocks)
};

template <typename T>
struct TrainerWorkspace;

template <typename T>
class Trainer {
 public:
  // Parameters start at zero; the caller fills params() (e.g. from lib/models/init.ts). scan_chunk:
  // tokens between the scan states kept for the backward (Mamba-2: also the SSD chunk length).
  explicit Trainer(const model::Config& config, int64_t scan_chunk = 64);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  const model::Config& config() const { return config_; }
  const std::vector<ParamSlot>& slots() const { return slots_; }
  // The slot of a name, or null.
  const ParamSlot* slot(const std::string& name) const;
  int64_t parameter_count() const { return (int64_t)params_.size(); }
  T* params() { return params_.data(); }
  const T* params() const { return params_.data(); }
  T* grads() { return grads_.data(); }
  const T* grads() const { return grads_.data(); }

  // Runs the model over `batch` sequences of `length` tokens (ids and targets [batch, length]; a
  // target < 0 is ignored) from zero states, and returns the summed cross-entropy. When `backward`,
  // adds loss_scale · d(Σ losses)/dθ to the gradients (the caller zeroes them between optimizer
  // steps; loss_scale is usually 1 / the tokens of the whole accumulated batch). Ids and targets are
  // checked (std::out_of_range naming the position).
  // With MoE blocks the objective differentiated is Σ losses + count · aux_weight() · BatchLoss::aux
  // (count = BatchLoss::count, the micro-batch's tokens with a target), so that with loss_scale =
  // 1 / the targets of the accumulated batch it is the mean cross-entropy plus aux_weight times the
  // micro-batches' load-balancing losses averaged by their targets.
  BatchLoss forward_backward(const int32_t* ids, const int32_t* targets, int64_t batch, int64_t length,
                             bool backward, T loss_scale);

  // The load-balancing loss's weight (default 0.01); ignored without MoE blocks.
  T aux_weight() const { return aux_weight_; }
  void set_aux_weight(T weight) { aux_weight_ = weight; }

  void zero_grads();
  // sqrt(Σ g²) over every gradient, in double.
  double grad_norm() const;
  void scale_grads(double factor);

  // Floats kept per token between the forward and the backward (all layers), without the scan's
  // boundary states (layers · di · N per scan_chunk tokens).
  int64_t activation_floats_per_token() const;
  // Floats per token of the buffers the backward works in (one layer at a time), kept between calls.
  int64_t working_floats_per_token() const;

 private:
  model::Config config_;
  int64_t scan_chunk_;
  T aux_weight_ = T(0.01);
  std::vector<ParamSlot> slots_;
  std::vector<T> params_, grads_;
  // The buffers of forward_backward, kept between calls (one call at a time).
  std::unique_ptr<TrainerWorkspace<T>> ws_;
};

// AdamW (Loshchilov & Hutter; PyTorch's order): for every element, with t the 1-based step,
//   p -= lr·weight_decay·p   (slots with decay only)
//   m = β1·m + (1-β1)·g;  v = β2·v + (1-β2)·g²
//   p -= lr · (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + eps)
struct AdamWParams {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.1;
  int64_t step = 1;
};
void adamw_update(float* params, const float* grads, float* m, float* v, const std::vector<ParamSlot>& slots,
                  const AdamWParams& hyper);

// One optimizer step of a float trainer: clips the gradients to a global norm of max_norm (0: no
// clipping), counts the step (*step += 1, which AdamW's bias corrections use), updates the parameters
// and zeroes the gradients. Returns the norm before clipping. A non-finite norm takes no step: the
// gradients are zeroed and std::runtime_error says so.
double optimizer_step(Trainer<float>& trainer, float* m, float* v, AdamWParams hyper, double max_norm,
                      int64_t* step);

}  // namespace mssm::train
