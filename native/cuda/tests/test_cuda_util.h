// Helpers of the CUDA kernel tests: the device check (skip, or fail under MAMBA_SSM_REQUIRE_GPU=1),
// device buffers poisoned with NaN before each run, and checks on every CUDA call and kernel status.
// The CPU kernels (baseline level, themselves tested against float64 references) are the reference.
#pragma once
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_kernels.h"
#include "tests/test_util.h"

namespace mssm::test {

// Returns -1 when a device is present (run the test), else the exit code: 0 (skipped) or 1 when
// MAMBA_SSM_REQUIRE_GPU=1 says the run must have a GPU (so a skip cannot pass for a success).
inline int device_or_exit_code(const char* name) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e == cudaSuccess && count > 0) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
      std::printf("%s: on %s (sm_%d%d)\n", name, prop.name, prop.major, prop.minor);
    return -1;
  }
  const char* require = std::getenv("MAMBA_SSM_REQUIRE_GPU");
  if (require && std::strcmp(require, "1") == 0) {
    std::fprintf(stderr, "%s: FAIL: no CUDA device (%s) and MAMBA_SSM_REQUIRE_GPU=1\n", name,
                 e == cudaSuccess ? "count 0" : cudaGetErrorString(e));
    return 1;
  }
  std::printf("%s: no CUDA device: skipped\n", name);
  return 0;
}

#define CUDA_OK(call)                                                                                     \
  do {                                                                                                    \
    cudaError_t e_ = (call);                                                                              \
    MSSM_CHECK(e_ == cudaSuccess, "%s: %s", #call, cudaGetErrorString(e_));                               \
    if (e_ != cudaSuccess) std::exit(::mssm::test::finish("aborted on a CUDA error"));                    \
  } while (0)

// A kernel call's Status, then a synchronisation so that errors of the kernel itself show here.
#define KERNEL_OK(status_expr)                                                   \
  do {                                                                           \
    ::mssm::cuda::Status s_ = (status_expr);                                     \
    MSSM_CHECK(s_.ok(), "%s", s_.message.c_str());                               \
    CUDA_OK(cudaDeviceSynchronize());                                            \
  } while (0)

// fp32 device memory of n elements (at least one, so that null means "absent" only by choice).
struct DeviceBuffer {
  float* ptr = nullptr;
  size_t n = 0;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count) : n(count) { CUDA_OK(cudaMalloc(&ptr, (count ? count : 1) * sizeof(float))); }
  explicit DeviceBuffer(const std::vector<float>& v) : DeviceBuffer(v.size()) { upload(v); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr(o.ptr), n(o.n) { o.ptr = nullptr; }
  ~DeviceBuffer() { if (ptr) cudaFree(ptr); }
  void upload(const std::vector<float>& v) {
    if (v.size() != n) std::abort();
    CUDA_OK(cudaMemcpy(ptr, v.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  }
  // Every byte 0xff: a NaN in every element, so an unwritten output cannot pass.
  void poison() { CUDA_OK(cudaMemset(ptr, 0xff, n * sizeof(float))); }
  std::vector<float> download() const {
    std::vector<float> v(n);
    CUDA_OK(cudaMemcpy(v.data(), ptr, n * sizeof(float), cudaMemcpyDeviceToHost));
    return v;
  }
};

// int32 device memory of n elements (token ids, expert indices).
struct DeviceInts {
  int32_t* ptr = nullptr;
  size_t n = 0;
  explicit DeviceInts(size_t count) : n(count) { CUDA_OK(cudaMalloc(&ptr, (count ? count : 1) * sizeof(int32_t))); }
  explicit DeviceInts(const std::vector<int32_t>& v) : DeviceInts(v.size()) { upload(v); }
  DeviceInts(const DeviceInts&) = delete;
  DeviceInts& operator=(const DeviceInts&) = delete;
  ~DeviceInts() { if (ptr) cudaFree(ptr); }
  void upload(const std::vector<int32_t>& v) {
    if (v.size() != n) std::abort();
    CUDA_OK(cudaMemcpy(ptr, v.data(), n * sizeof(int32_t), cudaMemcpyHostToDevice));
  }
  std::vector<int32_t> download() const {
    std::vector<int32_t> v(n);
    CUDA_OK(cudaMemcpy(v.data(), ptr, n * sizeof(int32_t), cudaMemcpyDeviceToHost));
    return v;
  }
};

inline int64_t count_nan(const std::vector<float>& v) {
  int64_t k = 0;
  for (float x : v) k += std::isnan(x) ? 1 : 0;
  return k;
}

// Every element written (no NaN left from the poison) and within rel of want (floor as test_util.h).
inline void expect_gpu_close(const std::string& what, const std::vector<float>& got, const std::vector<float>& want,
                             double rel, double floor) {
  MSSM_CHECK(got.size() == want.size(), "%s: size %zu vs %zu", what.c_str(), got.size(), want.size());
  const int64_t unwritten = count_nan(got);
  MSSM_CHECK(unwritten == 0, "%s: %lld elements not written (NaN)", what.c_str(), (long long)unwritten);
  expect_close(what.c_str(), got.data(), want.data(), (int64_t)got.size(), rel, floor);
}

inline const cpu::KernelTable& reference_kernels() {
  const cpu::KernelTable* t = cpu::kernels_for(CpuLevel::baseline);
  return t ? *t : cpu::kernels();
}

}  // namespace mssm::test
