// The model runner: a whole Mamba-1 / Mamba-2 language model, prefill or one decode step, in one call,
// optionally with mixture-of-experts MLP blocks between the Mamba mixers (BlackMamba).
//
// A Model is a configuration (the sizes of lib/models/config.ts) plus pointers to weights under the
// canonical names of that file; it owns no weight memory (the caller keeps the weights alive and
// unchanged for the model's lifetime). Every computation goes through the CPU kernels of the level in
// use (mssm::cpu::kernels()). Nothing here knows of Node.
//
// Glossary (sizes):
//   d       hidden size (d_model)           di   inner size (d_inner)        N   SSM state size
//   K       causal conv width               R    Mamba-1 rank of Δ (dt_rank)
//   H, P    Mamba-2 heads and head size (di = H·P)     G   Mamba-2 B/C groups
//   conv channels   Mamba-1 di;  Mamba-2 di + 2·G·N  (the conv runs over x, B and C)
//
// Language model (DESIGN.md), residual stream in fp32:
//   h = embedding(ids)
//   per layer i:  residual = h + residual (layer 0: residual = h);  h = block_i(rmsnorm(residual))
//   residual = h + residual;  logits = lm_head · rmsnorm_f(residual)    (lm_head = embeddings when tied)
// block_i is the Mamba mixer, or, for the layers listed in moe.layers, the MoE-MLP block of
// cpu/kernels.h (router → top-k experts → GLU MLPs → weighted combine); an MoE block has no state.
//
// State layout (f32, all of it contiguous, row-major), for a batch of `batch` sequences, where
// "layers" counts the Mamba layers only (state_layers(); the l-th Mamba layer in model order):
//   conv state  [layers][batch][K-1][conv channels]       the K-1 conv inputs before the next token
//   ssm state   Mamba-1 [layers][batch][di][N];  Mamba-2 [layers][batch][H][P][N]
// Sequence b's state is, in each layer l, the contiguous block at (l·batch + b)·per_sequence floats
// (per_sequence = conv_state_floats() or ssm_state_floats()), so one sequence can be cut out of, or
// gathered into, a batch by copying `layers` blocks.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "../core/dtype.h"
#include "../cpu/kernels.h"

namespace mssm::model {

enum class Architecture : int32_t { mamba1 = 1, mamba2 = 2 };

// The mixture-of-experts MLP blocks of a model (none when layers is empty). Each expert is a GLU MLP
// of width `hidden`: fc1 [2·hidden, d], fc2 [d, hidden] (cpu::MoeExpertsArgs).
struct MoeConfig {
  std::vector<int64_t> layers;  // indices of the MoE blocks, strictly increasing
  int64_t experts = 0;          // E
  int64_t top_k = 1;            // k
  int64_t hidden = 0;           // each expert's GLU width
  cpu::MoeScoring scoring = cpu::MoeScoring::softmax;
  bool renormalize = true;      // the k chosen scores divided by their sum
  cpu::Activation activation = cpu::Activation::silu;
  bool bias = false;            // router, fc1 and fc2 biases
};

struct Config {
  Architecture architecture = Architecture::mamba1;
  int64_t hidden_size = 0;        // d
  int64_t num_layers = 0;
  int64_t vocab_size = 0;         // rows of the embedding and of the output head
  int64_t intermediate_size = 0;  // di
  int64_t state_size = 0;         // N
  int64_t conv_kernel = 0;        // K
  int64_t time_step_rank = 0;     // R (Mamba-1)
  int64_t num_heads = 0;          // H (Mamba-2)
  int64_t head_dim = 0;           // P (Mamba-2)
  int64_t num_groups = 1;         // G (Mamba-2)
  int64_t chunk_size = 256;       // SSD chunk length (Mamba-2)
  bool use_bias = false;          // in_proj / out_proj biases
  bool use_conv_bias = true;
  float norm_eps = 1e-5f;
  float time_step_min = 0.0f;     // Mamba-2 clamp of dt after the softplus
  float time_step_max = __builtin_huge_valf();
  bool norm_before_gate = false;  // Mamba-2 gated norm order
  bool tie_embeddings = true;
  MoeConfig moe;

  bool mamba1() const { return architecture == Architecture::mamba1; }
  int64_t conv_channels() const { return mamba1() ? intermediate_size : intermediate_size + 2 * num_groups * state_size; }
  int64_t in_proj_rows() const {
    return mamba1() ? 2 * intermediate_size : 2 * intermediate_size + 2 * num_groups * state_size + num_heads;
  }
  // Floats of one sequence's state in one layer.
  int64_t conv_state_floats() const { return (conv_kernel - 1) * conv_channels(); }
  int64_t ssm_state_floats() const { return intermediate_size * state_size; }  // Mamba-2: H·P·N = di·N
  bool is_moe_layer(int64_t i) const;
  // Layers with a Mamba mixer (the ones with state), and the state index of Mamba layer i (the
  // number of Mamba layers before it).
  int64_t state_layers() const { return num_layers - (int64_t)moe.layers.size(); }
  int64_t state_index(int64_t i) const;
  // The experts' arguments of one MoE block over `rows` tokens of x [rows, d], with the router's choice
  // (indices, weights) and the output; the expert weights, their dtypes and biases are the runner's to
  // set (host or device memory).
  cpu::MoeExpertsArgs moe_experts_args(int64_t rows, const float* x, const int32_t* indices, const float* weights,
                                       float* out) const {
    cpu::MoeExpertsArgs e;
    e.tokens = rows, e.dim = hidden_size, e.hidden = moe.hidden, e.experts = moe.experts, e.top_k = moe.top_k;
    e.activation = moe.activation;
    e.x = x, e.indices = indices, e.weights = weights, e.out = out;
    return e;
  }
};

// Checks the sizes for consistency; throws std::invalid_argument naming the field.
void validate_config(const Config& config);

// One weight as the caller holds it. `bytes` is the size of the memory at `data` (checked against
// dtype × shape).
struct Weight {
  const void* data = nullptr;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  int64_t bytes = 0;
};

// A canonical weight the configuration needs: its name, shape, and whether it is a matrix (which may
// be f32, f16, bf16 or q8_0; every other weight is f32).
struct WeightSpec {
  std::string name;
  std::vector<int64_t> shape;
  bool matrix = false;
};
std::vector<WeightSpec> expected_weights(const Config& config);

struct LayerWeights {
  Weight norm, in_proj, in_proj_bias, conv, conv_bias, x_proj, dt_proj, dt_bias, A, D, ssm_norm, out_proj,
      out_proj_bias;
  // MoE blocks: router [E, d], fc1 [E, 2·hidden, d], fc2 [E, d, hidden] and their biases.
  Weight router, router_bias, fc1, fc1_bias, fc2, fc2_bias;
};

// One prefill over several sequences. Tokens of the sequences lie one after another in `ids`.
struct ForwardArgs {
  const int32_t* ids = nullptr;       // [Σ lengths]
  const int64_t* lengths = nullptr;   // [sequences], each >= 1
  int64_t sequences = 0;
  bool last_only = false;             // logits only for the last token of each sequence
  // last_only: [sequences, vocab];  padded_length 0: [Σ lengths, vocab] (packed like ids);
  // padded_length P >= every length: [sequences, P, vocab], rows past a sequence's end left untouched.
  float* logits = nullptr;
  int64_t padded_length = 0;
  // States in the layout above with batch = sequences; either may be null (not kept). When
  // use_initial_state, both must be given and hold the states to start from; else the pass starts
  // from zeros. On return they hold the states after each sequence's last token.
  float* conv_state = nullptr;
  float* ssm_state = nullptr;
  bool use_initial_state = false;
  // Tokens per pass through the layers (0: the default, 512 rounded to whole SSD chunks). A longer
  // sequence is run in segments with the states carried over, which bounds the scratch memory.
  int64_t segment_tokens = 0;
};

// One decode step: one token for each of `batch` sequences.
struct StepArgs {
  const int32_t* ids = nullptr;  // [batch]
  int64_t batch = 0;
  float* conv_state = nullptr;   // [layers][batch][K-1][conv channels], updated in place
  float* ssm_state = nullptr;    // [layers][batch][...], updated in place
  float* logits = nullptr;       // [batch, vocab]
};

struct Workspace;

class Model {
 public:
  // Checks the configuration and every weight (present, shape, dtype, byte size, q8_0 row lengths);
  // throws std::invalid_argument naming the weight. Names not in expected_weights() are refused too.
  Model(const Config& config, const std::unordered_map<std::string, Weight>& weights);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const Config& config() const { return config_; }

  // Token ids are checked to lie in [0, vocab) (std::out_of_range naming the position) before any
  // work. Safe to call from several threads at once on distinct output and state buffers.
  void forward(const ForwardArgs& args) const;
  void step(const StepArgs& args) const;

  // Floats of the whole state of `batch` sequences.
  int64_t conv_state_floats(int64_t batch) const { return config_.state_layers() * batch * config_.conv_state_floats(); }
  int64_t ssm_state_floats(int64_t batch) const { return config_.state_layers() * batch * config_.ssm_state_floats(); }

 private:
  // Runs every layer over `rows` rows of hidden states in ws (the embedded tokens in ws.residual; the
  // last mixer's output left in ws.hidden). Prefill: one sequence of `rows` tokens, starting from zero
  // states unless read_state; decode: `rows` sequences of one token, states updated in place.
  // Where layer i's state of the rows' first sequence lies: base + (i·batch + index)·floats.
  struct StateView {
    float* base;
    int64_t batch, index;
    float* layer(int64_t i, int64_t floats) const { return base + (i * batch + index) * floats; }
  };
  void run_layers(Workspace& ws, int64_t rows, bool decode, bool read_state, StateView conv_state,
                  StateView ssm_state) const;
  void mixer_mamba1(Workspace& ws, const LayerWeights& w, int64_t rows, bool decode, const float* conv_in,
                    float* conv_out, const float* ssm_in, float* ssm_out) const;
  void mixer_mamba2(Workspace& ws, const LayerWeights& w, int64_t rows, bool decode, const float* conv_in,
                    float* conv_out, const float* ssm_in, float* ssm_out) const;
  void moe_block(Workspace& ws, const LayerWeights& w, int64_t rows) const;
  void check_ids(const int32_t* ids, int64_t count) const;
  std::unique_ptr<Workspace> acquire(int64_t rows) const;
  void release(std::unique_ptr<Workspace> ws) const;

  Config config_;
  Weight embeddings_, norm_f_, lm_head_;
  std::vector<LayerWeights> layers_;
  // Scratch kept between calls so a decode step allocates nothing; one per concurrent call.
  mutable std::mutex cache_mutex_;
  mutable std::vector<std::unique_ptr<Workspace>> cache_;
};

}  // namespace mssm::model
