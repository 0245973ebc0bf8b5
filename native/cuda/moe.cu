// Mixture-of-experts blocks on the device (cuda_kernels.h): the router's top-k, the grouping of
// (token, slot) pairs by expert, the experts' GLU MLPs as grouped products, and the weighted combine.
// Everything stays on the device and in stream order (no host sync, no allocation), so a decode step
// with MoE layers is captured in a CUDA graph like any other.
//
// The grouping follows the CPU kernel (native/cpu/moe.cpp): a counting sort of the pairs in (token,
// slot) order, so each expert's rows, and every later sum, come in the same order whatever the
// launch shape. Expert e's rows are [offsets[e], offsets[e + 1]) of the gathered activations; the
// grouped GEMM (gemm.cuh) reads those bounds on the device. Pairs whose index lies outside [0, E)
// contribute nothing; top_k > E gives the extra slots index 0 and weight 0 (as the CPU router does),
// so expert 0 may then hold a token more than once.
#include "cuda_common.cuh"
#include "cuda_kernels.h"
#include "gemm.cuh"
#include "moe_block.h"

namespace mssm::cuda {
namespace {

using detail::ceil_div;
using detail::grid_for;

// One thread per token (moe_block.h).
__global__ void route_kernel(const float* logits, int64_t tokens, int64_t experts, int64_t top_k, bool softmax,
                             bool renormalize, float* weights, int32_t* indices) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t < tokens) moe::route_token(logits, experts, top_k, softmax, renormalize, weights, indices, t);
}

using moe::kGroupThreads;

// Block e of the grouping (moe_block.h).
__global__ void __launch_bounds__(kGroupThreads)
    group_kernel(const int32_t* indices, int64_t tokens, int64_t top_k, int64_t* offsets, int64_t* pair,
                 int64_t* position, bool place) {
  moe::group_block(indices, tokens, top_k, offsets, pair, position, place, blockIdx.x);
}

// offsets[0] = 0 and the counts in offsets[1..E] become running sums (one thread: E is small).
__global__ void prefix_kernel(int64_t* offsets, int64_t experts) {
  offsets[0] = 0;
  for (int64_t e = 0; e < experts; ++e) offsets[e + 1] += offsets[e];
}

__global__ void fill_kernel(int64_t* p, int64_t n, int64_t value) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = value;
}

// Grid-stride loops over moe_block.h's elements.
__global__ void gather_kernel(const float* x, const int64_t* pair, const int64_t* offsets, int64_t experts,
                              int64_t top_k, int64_t dim, int64_t max_rows, float* gathered) {
  const int64_t rows = offsets[experts];
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < max_rows * dim; i += (int64_t)gridDim.x * blockDim.x)
    moe::gather_element(x, pair, rows, top_k, dim, gathered, i);
}

__global__ void glu_kernel(const float* h, const int64_t* offsets, int64_t experts, int64_t hidden, int64_t max_rows,
                           cpu::Activation activation, float* glu) {
  const int64_t rows = offsets[experts];
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < max_rows * hidden;
       i += (int64_t)gridDim.x * blockDim.x)
    moe::glu_element(h, rows, hidden, activation, glu, i);
}

__global__ void combine_kernel(const float* expert_out, const int64_t* position, const float* weights, int64_t tokens,
                               int64_t top_k, int64_t dim, float* out) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < tokens * dim; i += (int64_t)gridDim.x * blockDim.x)
    moe::combine_element(expert_out, position, weights, top_k, dim, out, i);
}

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// The workspace's parts, in order (moe_experts_workspace_bytes sums them).
struct MoeWork {
  int64_t* offsets;
  int64_t* pair;
  int64_t* position;
  float *gathered, *fc1_out, *glu, *expert_out;
};

size_t carve(void* base, int64_t tokens, int64_t top_k, int64_t dim, int64_t hidden, int64_t experts, MoeWork* w) {
  const int64_t pairs = tokens * top_k;
  const size_t sizes[] = {align256((size_t)(experts + 1) * 8), align256((size_t)pairs * 8), align256((size_t)pairs * 8),
                          align256((size_t)(pairs * dim) * 4), align256((size_t)(pairs * 2 * hidden) * 4),
                          align256((size_t)(pairs * hidden) * 4), align256((size_t)(pairs * dim) * 4)};
  size_t total = 0;
  void* parts[7];
  for (int i = 0; i < 7; ++i) {
    parts[i] = base ? static_cast<char*>(base) + total : nullptr;
    total += sizes[i];
  }
  if (w) {
    w->offsets = static_cast<int64_t*>(parts[0]);
    w->pair = static_cast<int64_t*>(parts[1]);
    w->position = static_cast<int64_t*>(parts[2]);
    w->gathered = static_cast<float*>(parts[3]);
    w->fc1_out = static_cast<float*>(parts[4]);
    w->glu = static_cast<float*>(parts[5]);
    w->expert_out = static_cast<float*>(parts[6]);
  }
  return total;
}

}  // namespace

Status moe_route(const float* logits, int64_t tokens, int64_t experts, int64_t top_k, cpu::MoeScoring scoring,
                 bool renormalize, float* weights, int32_t* indices, cudaStream_t stream) {
  if (tokens <= 0 || experts <= 0 || top_k <= 0) return {};
  route_kernel<<<(unsigned)ceil_div(tokens, 128), 128, 0, stream>>>(
      logits, tokens, experts, top_k, scoring == cpu::MoeScoring::softmax, renormalize, weights, indices);
  return detail::check_launch("moe_route");
}

size_t moe_experts_workspace_bytes(int64_t tokens, int64_t top_k, int64_t dim, int64_t hidden, int64_t experts) {
  return carve(nullptr, tokens, top_k, dim, hidden, experts, nullptr);
}

Status moe_experts(const cpu::MoeExpertsArgs& a, void* workspace, cudaStream_t stream) {
  const char* op = "moe_experts";
  const int64_t T = a.tokens, D = a.dim, H = a.hidden, E = a.experts, k = a.top_k;
  if (T <= 0 || D <= 0) return {};
  if (H <= 0 || E <= 0 || k <= 0) return detail::error(op, "hidden, experts and top_k must be at least 1");
  for (DType t : {a.fc1_dtype, a.fc2_dtype})
    if (t != DType::f32 && t != DType::bf16)
      return detail::error(op, std::string("expert weights must be f32 or bf16 on the device, got ") + dtype_name(t));
  if (!workspace) return detail::error(op, "a workspace of moe_experts_workspace_bytes() is required");
  if (E > 65535) return detail::error(op, std::to_string(E) + " experts exceed the grid's 65535");
  MoeWork w;
  carve(workspace, T, k, D, H, E, &w);
  const int64_t pairs = T * k;
  const int64_t max_rows = moe::max_rows(T, k, E);

  fill_kernel<<<grid_for(pairs), 256, 0, stream>>>(w.position, pairs, -1);
  MSSM_STATUS_TRY(detail::check_launch(op));
  group_kernel<<<(unsigned)E, kGroupThreads, 0, stream>>>(a.indices, T, k, w.offsets, w.pair, w.position, false);
  MSSM_STATUS_TRY(detail::check_launch(op));
  prefix_kernel<<<1, 1, 0, stream>>>(w.offsets, E);
  MSSM_STATUS_TRY(detail::check_launch(op));
  group_kernel<<<(unsigned)E, kGroupThreads, 0, stream>>>(a.indices, T, k, w.offsets, w.pair, w.position, true);
  MSSM_STATUS_TRY(detail::check_launch(op));
  gather_kernel<<<grid_for(pairs * D), 256, 0, stream>>>(a.x, w.pair, w.offsets, E, k, D, pairs, w.gathered);
  MSSM_STATUS_TRY(detail::check_launch(op));

  const bool bf16_1 = a.fc1_dtype == DType::bf16, bf16_2 = a.fc2_dtype == DType::bf16;
  detail::GemmGroups g1{w.offsets, 2 * H * D, 2 * H};
  MSSM_STATUS_TRY(detail::builtin_gemm(w.gathered, D, a.fc1, bf16_1, a.fc1_bias, w.fc1_out, 2 * H, max_rows, 2 * H, D,
                                       stream, g1, E));
  glu_kernel<<<grid_for(pairs * H), 256, 0, stream>>>(w.fc1_out, w.offsets, E, H, pairs, a.activation, w.glu);
  MSSM_STATUS_TRY(detail::check_launch(op));
  detail::GemmGroups g2{w.offsets, D * H, D};
  MSSM_STATUS_TRY(
      detail::builtin_gemm(w.glu, H, a.fc2, bf16_2, a.fc2_bias, w.expert_out, D, max_rows, D, H, stream, g2, E));
  combine_kernel<<<grid_for(T * D), 256, 0, stream>>>(w.expert_out, w.position, a.weights, T, k, D, a.out);
  return detail::check_launch(op);
}

}  // namespace mssm::cuda
