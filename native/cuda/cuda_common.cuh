// Shared helpers of the CUDA kernel files: error reporting, launch checks, the device's shared-memory
// limit, the chunked SSD backward's entry points (ssd_train.cu) for scan_train.cu, and (from scalar.h)
// the scalar functions of the model equations (softplus, silu) in the same form the CPU kernels use.
#pragma once
#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "cuda_kernels.h"
#include "scalar.h"

namespace mssm::cuda::detail {

inline Status error(const char* op, const std::string& what) { return Status{std::string("mamba-ssm cuda ") + op + ": " + what}; }

inline Status cuda_error(const char* op, const char* call, cudaError_t e) {
  return error(op, std::string(call) + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

// Checks the launch that was just enqueued (bad configuration, missing kernel image, …).
inline Status check_launch(const char* op) {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : cuda_error(op, "kernel launch", e);
}

#define MSSM_CUDA_TRY(op, call)                                                         \
  do {                                                                                  \
    cudaError_t mssm_e_ = (call);                                                       \
    if (mssm_e_ != cudaSuccess) return ::mssm::cuda::detail::cuda_error(op, #call, mssm_e_); \
  } while (0)

#define MSSM_STATUS_TRY(expr)                 \
  do {                                        \
    ::mssm::cuda::Status mssm_s_ = (expr);    \
    if (!mssm_s_.ok()) return mssm_s_;        \
  } while (0)

using scalar::min64;
using scalar::silu;
using scalar::softplus;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The shared memory one block may opt in to on the current device (48 KiB if it cannot be read).
inline int shared_limit() {
  int device = 0, limit = 48 * 1024;
  if (cudaGetDevice(&device) == cudaSuccess)
    cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return limit;
}

// Blocks of a grid-stride loop over `total` elements (at least 1, capped where more add nothing).
inline unsigned grid_for(int64_t total, int threads = 256) {
  return (unsigned)(total <= 0 ? 1 : min64(ceil_div(total, threads), 65535 * 8));
}

// The chunked SSD backward for training (ssd_train.cu): the state tile width that fits this device's
// shared memory with `math` (0: none fits), its workspace, and the launch.
int ssd_backward_chunked_tile(const train::SsdTrainArgs& a, SsdMath math);
size_t ssd_backward_chunked_workspace_bytes(const train::SsdTrainArgs& a);
Status ssd_backward_chunked(const train::SsdTrainArgs& a, const train::SsdTrainTensors<float>& t, const float* boundary,
                            const float* dy, const train::SsdTrainGrads<float>& g, SsdMath math, int Nt,
                            void* workspace, cudaStream_t stream);

}  // namespace mssm::cuda::detail
