// The CPU kernels of the Mamba family, and the table that selects one compiled level of them.
//
// Every kernel source in native/cpu/ is compiled once per CPU level (baseline, avx2, avx512, avx512bf16) into its
// own namespace, mssm::cpu::<level>; table.cpp gathers each level's functions into a KernelTable and
// kernels() returns the table of the level in use. All tensors are contiguous, row-major, fp32 unless
// a DType says otherwise. Glossary of sizes:
//   M, N, K   matmul rows, output features, input features        (y[M,N] = x[M,K] · W[N,K]ᵀ)
//   batch     independent sequences;  length  tokens per sequence (L)
//   channels  Mamba-1 d_inner (D);     state   SSM state size (N);  groups  B/C groups (G)
//   heads     Mamba-2 heads (H);       head_dim  P;  chunk_size  Q
#pragma once
#include <cstdint>

#include "../core/cpu_features.h"
#include "../core/dtype.h"

namespace mssm::cpu {

// ---- Mamba-1 selective scan (S6) -------------------------------------------------------------
// delta' = softplus(delta + delta_bias) (softplus only when delta_softplus; softplus(v) = v for v > 20)
// s_t = exp(delta'_t · A) ⊙ s_{t-1} + (delta'_t · u_t) ⊗ B_t      s [channels, state]
// y_t = s_t · C_t + D ⊙ u_t ;  y_t *= silu(z_t) when z is given
// Channel d reads B and C of group d / (channels / groups); channels % groups == 0 (callers check).
struct SelectiveScanArgs {
  int64_t batch = 1, length = 1, channels = 0, state = 0, groups = 1;
  const float* u = nullptr;           // [batch, length, channels]
  const float* delta = nullptr;       // [batch, length, channels]
  const float* A = nullptr;           // [channels, state]  (negative: -exp(A_log))
  const float* B = nullptr;           // [batch, length, groups, state]
  const float* C = nullptr;           // [batch, length, groups, state]
  const float* D = nullptr;           // [channels] or null
  const float* z = nullptr;           // [batch, length, channels] or null
  const float* delta_bias = nullptr;  // [channels] or null
  bool delta_softplus = false;
  const float* state_in = nullptr;    // [batch, channels, state] or null (zeros)
  float* state_out = nullptr;         // [batch, channels, state] or null; may equal state_in
  float* y = nullptr;                 // [batch, length, channels]
};

// ---- Mamba-2 state-space duality (SSD) -------------------------------------------------------
// dt' = clamp(softplus(dt + dt_bias), dt_min, dt_max)   (softplus only when dt_softplus)
// s_t[h] = exp(dt'_t[h] · A[h]) · s_{t-1}[h] + dt'_t[h] · x_t[h] ⊗ B_t[g(h)]   s[h] [head_dim, state]
// y_t[h] = s_t[h] · C_t[g(h)] + D[h] · x_t[h] ;  y_t *= silu(z_t) when z is given
// Head h reads B and C of group g(h) = h / (heads / groups). The chunked form splits the sequence
// into chunks of chunk_size tokens (the last may be shorter).
struct SsdArgs {
  int64_t batch = 1, length = 1, heads = 0, head_dim = 0, state = 0, groups = 1, chunk_size = 256;
  const float* x = nullptr;        // [batch, length, heads, head_dim]
  const float* dt = nullptr;       // [batch, length, heads]
  const float* A = nullptr;        // [heads]  (negative)
  const float* B = nullptr;        // [batch, length, groups, state]
  const float* C = nullptr;        // [batch, length, groups, state]
  const float* D = nullptr;        // [heads] or null
  const float* z = nullptr;        // [batch, length, heads, head_dim] or null
  const float* dt_bias = nullptr;  // [heads] or null
  bool dt_softplus = false;
  float dt_min = 0.0f, dt_max = __builtin_huge_valf();
  const float* state_in = nullptr;  // [batch, heads, head_dim, state] or null (zeros)
  float* state_out = nullptr;       // [batch, heads, head_dim, state] or null; may equal state_in
  float* y = nullptr;               // [batch, length, heads, head_dim]
  // Floats between consecutive tokens (and, for ssd_step, sequences) of x, and of B and C; 0 for the
  // packed layouts above (heads·head_dim, groups·state). The model runner reads x, B and C in place
  // from the conv output, where they sit side by side in each token's row.
  int64_t x_stride = 0, bc_stride = 0;
  // ssd_chunked only: the chunk products (C·S, the masked C·Bᵀ times x, Bᵀ times x) take their
  // operands rounded to bf16 and accumulate in f32 (VDPBF16PS), as the prefill GEMM does for bf16
  // weights; the state is still carried in f32. For models whose weights are bf16. Levels without
  // avx512bf16 ignore it.
  bool bf16_products = false;
};

// ---- Mixture of experts ----------------------------------------------------------------------
enum class MoeScoring : int32_t { softmax = 0, sigmoid = 1 };
enum class Activation : int32_t { silu = 0, gelu = 1, gelu_tanh = 2 };

// Each chosen expert e runs a GLU MLP on token t:
//   h = fc1[e] · x_t (+ fc1_bias[e]);  a, b = h[:hidden], h[hidden:];  o = fc2[e] · (act(a) ⊙ b) (+ fc2_bias[e])
// out_t = Σ_k weights[t,k] · o(indices[t,k]). Tokens are grouped by expert so each expert's weights
// are read once per call.
struct MoeExpertsArgs {
  int64_t tokens = 0, dim = 0, hidden = 0, experts = 0, top_k = 1;
  const float* x = nullptr;                                   // [tokens, dim]
  const void* fc1 = nullptr; DType fc1_dtype = DType::f32;    // [experts, 2·hidden, dim]
  const float* fc1_bias = nullptr;                            // [experts, 2·hidden] or null
  const void* fc2 = nullptr; DType fc2_dtype = DType::f32;    // [experts, dim, hidden]
  const float* fc2_bias = nullptr;                            // [experts, dim] or null
  Activation activation = Activation::silu;
  const int32_t* indices = nullptr;                           // [tokens, top_k]
  const float* weights = nullptr;                             // [tokens, top_k]
  float* out = nullptr;                                       // [tokens, dim] (overwritten)
};

// ---- Sampling --------------------------------------------------------------------------------
// Order: repetition penalty (HF rule: a positive logit is divided by the penalty, a negative one
// multiplied) over penalty_tokens, then temperature (0: argmax), top_k (0: off), top_p (1: off),
// min_p (0: off), softmax, one draw from the seeded generator.
struct SamplingParams {
  float temperature = 1.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  const int32_t* penalty_tokens = nullptr;
  int64_t penalty_count = 0;
};

// The sampler's generator: one splitmix64 step of *state, and the draw a sample takes from it, the
// top 24 bits as (bits >> 40) · 2⁻²⁴ (exact in a float). One draw per token, greedy ones included, so
// a stream's position is the number of tokens drawn whatever the parameters were.
inline uint64_t splitmix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
inline float sampling_draw(uint64_t* state) { return (float)(splitmix64(state) >> 40) * (1.0f / 16777216.0f); }

struct KernelTable {
  const char* level;

  // y[M,N] = x[M,K] · W[N,K]ᵀ (+ bias[N]). W in f32, f16, bf16 or q8_0 (q8_0: K % 32 == 0).
  // M == 1 is the decode (matvec) case. Every level uses W's stored values exactly and x as given,
  // except the avx512bf16 level, which rounds x to bf16 for bf16 weights on the many-rows (prefill)
  // path (about 2e-3 of the output's RMS).
  void (*matmul)(const float* x, const void* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N,
                 int64_t K);
  // matmul for a decode step: the same, except that at the avx512bf16 level (VNNI int8 products) q8_0
  // weights with few rows of x (up to 4, or 8 when K < 256) quantise x to 8 bits per block of 32 (an
  // f32 scale per block, as llama.cpp's q8_0 products do): about 5e-3 of the output's RMS, for
  // products that keep up with reading the weights; and q8_0 weights with many rows of x (more than
  // 12, or 8 when K < 256: a step of many sequences) round both the weights and x to bf16 for BF16
  // dot products (about 3e-3), twice the f32 rate.
  void (*matmul_step)(const float* x, const void* w, DType w_dtype, const float* bias, float* y, int64_t M,
                      int64_t N, int64_t K);
  // Converts n elements between dtypes: f32 -> f16/bf16/q8_0 (n % 32 == 0 for q8_0) and back to f32.
  void (*convert)(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n);

  // out = rmsnorm(s) · weight with s = x (+ residual). When residual is given and residual_out is not
  // null, s is written there (the pre-norm residual stream). rows × dim.
  void (*rmsnorm)(const float* x, const float* residual, const float* weight, float* out, float* residual_out,
                  int64_t rows, int64_t dim, float eps);
  // Gated RMSNorm over groups of group_size within each row of dim:
  //   norm_before_gate false: out = rmsnorm_group(x ⊙ silu(z)) · weight
  //   norm_before_gate true:  out = rmsnorm_group(x) · weight ⊙ silu(z)
  // z may be null (no gate).
  void (*gated_rmsnorm)(const float* x, const float* z, const float* weight, float* out, int64_t rows, int64_t dim,
                        int64_t group_size, float eps, bool norm_before_gate);
  // out[i] = table[ids[i]] as f32; ids already checked to lie in [0, vocab).
  void (*embedding)(const void* table, DType dtype, const int32_t* ids, float* out, int64_t count, int64_t dim);

  // Causal depthwise conv over time, channels last:
  //   y[b,t,c] = act(bias[c] + Σ_k w[c,k] · xp[b, t+k, c]),  xp = concat(state_in[b], x[b]) over time
  // state [batch, K-1, channels] holds the K-1 inputs before x (null state_in: zeros); state_out
  // receives the last K-1 rows of xp (null: not kept; may alias state_in). act is SiLU when silu, else
  // identity. bias may be null. y must not alias x.
  void (*conv1d)(const float* x, const float* w, const float* bias, const float* state_in, float* state_out, float* y,
                 int64_t batch, int64_t length, int64_t channels, int64_t kernel, bool silu);
  // One token: x [batch, channels]; state [batch, K-1, channels] updated in place.
  void (*conv1d_step)(const float* x, const float* w, const float* bias, float* state, float* y, int64_t batch,
                      int64_t channels, int64_t kernel, bool silu);

  void (*selective_scan)(const SelectiveScanArgs& args);
  // The one-step form: args.length must be 1; state_out must be set (usually == state_in).
  void (*selective_state_update)(const SelectiveScanArgs& args);

  void (*ssd_chunked)(const SsdArgs& args);
  // The one-step form: args.length must be 1; state_out must be set (usually == state_in).
  void (*ssd_step)(const SsdArgs& args);

  // logits [tokens, experts] -> scores (softmax or sigmoid) -> top_k per token (ties: lower index
  // first), renormalised to sum 1 when renormalize. counts[e] = tokens routed to e.
  void (*moe_route)(const float* logits, int64_t tokens, int64_t experts, int64_t top_k, MoeScoring scoring,
                    bool renormalize, float* weights, int32_t* indices, int32_t* counts);
  void (*moe_experts)(const MoeExpertsArgs& args);

  // out[r] = index of the largest logit of row r (ties: lowest index).
  void (*argmax)(const float* logits, int64_t rows, int64_t vocab, int32_t* out);
  // One token from logits [vocab] (not modified) with the uniform draw u in [0, 1) (sampling_draw
  // above). scratch: at least 2·vocab floats.
  int32_t (*sample)(const float* logits, int64_t vocab, const SamplingParams& params, float u, float* scratch);

  // The machine's ceilings, for benchmarks: FLOPs done by `iterations` rounds of independent FMA chains
  // on every thread of the pool, and the sum of n floats read across the pool. bf16_peak: the same with
  // bf16 pair dot products into fp32 (VDPBF16PS, 4 FLOPs a lane), 0 at a level that has none.
  double (*fma_peak)(int64_t iterations);
  double (*bf16_peak)(int64_t iterations);
  double (*read_sum)(const float* data, int64_t n);
};

// The table of the level in use (current_cpu_level()).
const KernelTable& kernels();
// The table of a given level, or null when this CPU cannot run it.
const KernelTable* kernels_for(CpuLevel level);

}  // namespace mssm::cpu
