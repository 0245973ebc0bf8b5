// The linear layer's forward and input gradient of ops.h. In float both go through the CPU kernels'
// matmul (the inference GEMMs; the input gradient with Wᵀ copied once per call); in double (the
// gradient checks) they are plain loops.
#include <algorithm>
#include <vector>

#include "../core/threadpool.h"
#include "../cpu/kernels.h"
#include "ops.h"

namespace mssm::train {

void linear(const float* x, const float* W, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  cpu::kernels().matmul(x, W, DType::f32, bias, y, M, N, K);
}
void linear(const double* x, const double* W, const double* bias, double* y, int64_t M, int64_t N, int64_t K) {
  parallel_for(M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = bias ? bias[n] : 0.0;
        for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * W[n * K + k];
        y[m * N + n] = s;
      }
  });
}

void linear_input_grad(const float* dy, const float* W, float* dx, int64_t M, int64_t N, int64_t K, bool accumulate,
                       std::vector<float>& scratch) {
  scratch.resize((size_t)(K * N + (accumulate ? M * K : 0)));
  float* Wt = scratch.data();
  transpose(W, N, K, Wt);
  float* out = accumulate ? Wt + K * N : dx;
  cpu::kernels().matmul(dy, Wt, DType::f32, nullptr, out, M, K, N);
  if (accumulate) {
    parallel_for(M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin * K; i < end * K; ++i) dx[i] += out[i];
    });
  }
}
void linear_input_grad(const double* dy, const double* W, double* dx, int64_t M, int64_t N, int64_t K,
                       bool accumulate, std::vector<double>&) {
  parallel_for(M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      double* row = dx + m * K;
      if (!accumulate) std::fill(row, row + K, 0.0);
      for (int64_t n = 0; n < N; ++n) {
        const double g = dy[m * N + n];
        for (int64_t k = 0; k < K; ++k) row[k] += g * W[n * K + k];
      }
    }
  });
}

}  // namespace mssm::train
