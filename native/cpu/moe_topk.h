// The router's choice of experts, one token at a time, shared by the CPU kernel (moe.cpp), the CUDA one
// (native/cuda/moe.cu) and the trainer's (native/train/moe.cpp, in float or double), so that all pick
// the same experts in the same order with the same weights.
//
// Scores arrive expert by expert (e = 0, 1, …) and are inserted into a list kept in descending order of
// at most k entries; a later expert must score strictly higher to pass an earlier one, which is the
// lower-index-first rule for ties. finish() renormalises the k weights to sum 1 when asked, and gives
// the slots past k (top_k > experts) weight 0 and the index `unused` (the router: 0; the trainer: -1).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MSSM_HOST_DEVICE __host__ __device__
#else
#define MSSM_HOST_DEVICE
#endif

namespace mssm::cpu {

template <typename T>
struct TopK {
  T* w;              // [top_k] weights of the token
  int32_t* chosen;   // [top_k] experts of the token
  int64_t k;         // min(top_k, experts): the slots filled
  int64_t filled = 0;

  MSSM_HOST_DEVICE void insert(T s, int32_t e) {
    if (filled == k && !(s > w[k - 1])) return;
    int64_t j = filled < k ? filled++ : k - 1;
    while (j > 0 && s > w[j - 1]) {
      w[j] = w[j - 1];
      chosen[j] = chosen[j - 1];
      --j;
    }
    w[j] = s;
    chosen[j] = e;
  }

  MSSM_HOST_DEVICE void finish(int64_t top_k, bool renormalize, int32_t unused = 0) {
    if (renormalize) {
      T sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += w[j];
      const T inv = T(1) / sum;
      for (int64_t j = 0; j < k; ++j) w[j] *= inv;
    }
    for (int64_t j = k; j < top_k; ++j) {
      w[j] = 0;
      chosen[j] = unused;
    }
  }
};

}  // namespace mssm::cpu
