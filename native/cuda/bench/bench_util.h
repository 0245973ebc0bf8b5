// Error checks shared by the CUDA benchmark programs: any failure prints the program, the call and
// CUDA's message, and exits 1 (a benchmark that measured a failed launch would print nonsense).
#pragma once
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "../cuda_kernels.h"

namespace mssm::cuda::bench {

extern const char* const kProgram;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s: %s\n", kProgram, what, cudaGetErrorString(e));
    std::exit(1);
  }
}
void check(const cuda::Status& s) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", kProgram, s.message.c_str());
    std::exit(1);
  }
}
#define CK(call) check((call), #call)

}  // namespace mssm::cuda::bench
