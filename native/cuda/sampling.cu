// Token selection on the device (cuda_kernels.h): argmax, and one draw per row after the filters of
// cpu::KernelTable::sample, one block per row; the blocks' code is sampling_block.h's.
#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_kernels.h"
#include "sampling_block.h"

namespace mssm::cuda {
namespace {

using sampling::kThreads;
using sampling::RowParams;

__global__ void __launch_bounds__(kThreads) argmax_kernel(const float* logits, int64_t vocab, int32_t* out) {
  sampling::argmax_row(logits, vocab, out, blockIdx.x);
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* logits, int64_t V, RowParams p, const float* u, int32_t* out, float* work) {
  sampling::sample_row(logits, V, p, u, out, work, blockIdx.x);
}

}  // namespace

Status argmax(const float* logits, int64_t rows, int64_t vocab, int32_t* out, cudaStream_t stream) {
  if (rows <= 0) return {};
  if (rows > 0x7fffffff) return detail::error("argmax", "too many rows");
  if (vocab <= 0) {
    MSSM_CUDA_TRY("argmax", cudaMemsetAsync(out, 0, rows * sizeof(int32_t), stream));
    return {};
  }
  argmax_kernel<<<(unsigned)rows, kThreads, 0, stream>>>(logits, vocab, out);
  return detail::check_launch("argmax");
}

size_t sample_workspace_bytes(int64_t rows, int64_t vocab) { return (size_t)(rows * 2 * vocab) * sizeof(float); }

Status sample(const float* logits, int64_t rows, int64_t vocab, const cpu::SamplingParams& params, const float* u,
              int32_t* out, void* workspace, cudaStream_t stream) {
  const char* op = "sample";
  if (rows <= 0) return {};
  if (vocab <= 0) {
    MSSM_CUDA_TRY(op, cudaMemsetAsync(out, 0, rows * sizeof(int32_t), stream));
    return {};
  }
  if (!workspace) return detail::error(op, "a workspace of sample_workspace_bytes() is required");
  if (!u) return detail::error(op, "u (one uniform draw per row) is required");
  if (rows > 0x7fffffff) return detail::error(op, "too many rows");
  const RowParams p{params.temperature, params.top_p, params.min_p, params.repetition_penalty, params.top_k,
                    params.penalty_count, params.penalty_tokens};
  sample_kernel<<<(unsigned)rows, kThreads, 0, stream>>>(logits, vocab, p, u, out, static_cast<float*>(workspace));
  return detail::check_launch(op);
}

}  // namespace mssm::cuda
