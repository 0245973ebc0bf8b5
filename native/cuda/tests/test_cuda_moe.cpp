// The CUDA mixture-of-experts kernels (moe.cu) against the CPU kernels: moe_route (softmax and
// sigmoid scores, renormalised or not, top_k 1..3 and top_k > experts, ties) and moe_experts (f32 and
// bf16 expert weights, with and without biases, silu / gelu / gelu_tanh, 1 token to 300, experts 1 to
// 9, awkward dims; the tiled grouped product from 32 rows, the skinny one below; routings with an
// expert that gets no token, indices outside [0, E) that must contribute nothing, and one that sends
// every slot to one expert). Outputs are
// poisoned with NaN first.
// Tolerances: routing weights 4e-6 relative (a softmax of the same floats, CUDA's expf within 2 ulp
// against std::exp; then a sum, a reciprocal and the renormalisation) and identical indices; expert
// outputs 1e-4 relative against |want| + 0.1·RMS(want), as test_cuda_model (two products of fp32 sums
// in other orders, an expf inside the activation; the bf16 weights are the same values on both
// sides; a host simulation of the two summation orders alone reached 2.7e-4 against |want| + 1e-3·RMS).
#include <array>

#include "test_cuda_util.h"

using namespace mssm;
using namespace mssm::test;

namespace {

// bf16 bits of f32 values (the same rounding the CPU kernels and the model upload use).
std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  reference_kernels().convert(v.data(), DType::f32, out.data(), DType::bf16, (int64_t)v.size());
  return out;
}

void test_route(Rng& rng) {
  const auto& ref = reference_kernels();
  for (auto [tokens, experts, top_k] : {std::array<int64_t, 3>{1, 1, 1}, {5, 4, 2}, {33, 8, 2}, {300, 9, 3},
                                        {7, 2, 3}, {64, 16, 1}}) {
    for (int scoring = 0; scoring < 2; ++scoring) {
      for (bool renormalize : {false, true}) {
        auto logits = rng.normals(tokens * experts, 2);
        // Exact ties in some rows: equal logits must keep the lower expert first.
        for (int64_t t = 0; t < tokens; t += 3)
          for (int64_t e = 1; e < experts; e += 2) logits[t * experts + e] = logits[t * experts + e - 1];
        const auto sc = scoring ? cpu::MoeScoring::sigmoid : cpu::MoeScoring::softmax;
        std::vector<float> want_w(tokens * top_k);
        std::vector<int32_t> want_i(tokens * top_k);
        ref.moe_route(logits.data(), tokens, experts, top_k, sc, renormalize, want_w.data(), want_i.data(), nullptr);
        DeviceBuffer dl(logits), dw(tokens * top_k);
        DeviceInts di(std::vector<int32_t>(tokens * top_k, -7));
        dw.poison();
        KERNEL_OK(cuda::moe_route(dl.ptr, tokens, experts, top_k, sc, renormalize, dw.ptr, di.ptr, nullptr));
        const std::string what = "moe_route T" + std::to_string(tokens) + " E" + std::to_string(experts) + " k" +
                                 std::to_string(top_k) + (scoring ? " sigmoid" : " softmax") +
                                 (renormalize ? " renormalised" : "");
        expect_gpu_close(what + " weights", dw.download(), want_w, 4e-6, 1e-30);
        const auto got_i = di.download();
        int64_t differ = 0;
        for (size_t j = 0; j < got_i.size(); ++j) differ += got_i[j] != want_i[j];
        MSSM_CHECK(differ == 0, "%s: %lld indices differ", what.c_str(), (long long)differ);
      }
    }
  }
}

void test_experts(Rng& rng) {
  const auto& ref = reference_kernels();
  struct Case {
    int64_t tokens, dim, hidden, experts, top_k;
  };
  const Case cases[] = {{1, 37, 13, 1, 1}, {3, 48, 20, 4, 2}, {31, 40, 24, 5, 2}, {32, 40, 24, 5, 2},
                        {300, 64, 50, 9, 3}, {45, 33, 17, 3, 4}, {100, 96, 64, 8, 1}};
  for (const Case& c : cases) {
    const int64_t T = c.tokens, D = c.dim, H = c.hidden, E = c.experts, k = c.top_k;
    auto x = rng.normals(T * D);
    auto fc1 = rng.normals(E * 2 * H * D, 1.0f / std::sqrt((float)D));
    auto fc2 = rng.normals(E * D * H, 1.0f / std::sqrt((float)H));
    auto b1 = rng.normals(E * 2 * H, 0.1f), b2 = rng.normals(E * D, 0.1f);
    // A routing: k distinct experts per token (all of them when k ≥ E; then index 0 / weight 0 past
    // E, as the router gives), with expert E - 1 never chosen when E > k, and in some cases one index
    // outside [0, E), which must contribute nothing.
    std::vector<int32_t> indices(T * k);
    std::vector<float> weights = rng.uniforms(T * k, 0.1f, 1.0f);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pool = E > k ? E - 1 : E;
      for (int64_t j = 0; j < k; ++j) {
        if (j >= E) {
          indices[t * k + j] = 0;
          weights[t * k + j] = 0.0f;
        } else {
          indices[t * k + j] = (int32_t)((t * 7 + j * (pool > 1 ? 1 + (t % (pool - 1)) : 0)) % pool);
        }
      }
      // Keep the chosen experts distinct (the rule above can repeat one for small pools).
      for (int64_t j = 1; j < std::min(k, E); ++j)
        for (int64_t i = 0; i < j; ++i)
          if (indices[t * k + j] == indices[t * k + i]) indices[t * k + j] = (int32_t)((indices[t * k + j] + 1) % pool);
    }
    if (T > 2) indices[2 * k] = (int32_t)E + 3;  // outside [0, E)
    // A crowded routing as well: every slot of every token to expert 0 (more rows than the products'
    // grids are sized for; the CPU kernel accepts any indices, so must this one).
    if (T == 45) std::fill(indices.begin(), indices.end(), 0);
    for (int bf16 = 0; bf16 < 2; ++bf16) {
      for (int act = 0; act < 3; ++act) {
        for (bool biases : {false, true}) {
          cpu::MoeExpertsArgs a;
          a.tokens = T, a.dim = D, a.hidden = H, a.experts = E, a.top_k = k;
          a.activation = (cpu::Activation)act;
          a.indices = indices.data();
          a.weights = weights.data();
          a.x = x.data();
          const auto fc1_16 = to_bf16(fc1), fc2_16 = to_bf16(fc2);
          a.fc1 = bf16 ? (const void*)fc1_16.data() : fc1.data();
          a.fc2 = bf16 ? (const void*)fc2_16.data() : fc2.data();
          a.fc1_dtype = a.fc2_dtype = bf16 ? DType::bf16 : DType::f32;
          a.fc1_bias = biases ? b1.data() : nullptr;
          a.fc2_bias = biases ? b2.data() : nullptr;
          std::vector<float> want(T * D);
          a.out = want.data();
          ref.moe_experts(a);

          DeviceBuffer dx(x), db1(b1), db2(b2), dwt(weights), out(T * D);
          DeviceInts didx(indices);
          void *dfc1 = nullptr, *dfc2 = nullptr, *work = nullptr;
          const size_t w1 = fc1.size() * (bf16 ? 2 : 4), w2 = fc2.size() * (bf16 ? 2 : 4);
          CUDA_OK(cudaMalloc(&dfc1, w1));
          CUDA_OK(cudaMalloc(&dfc2, w2));
          CUDA_OK(cudaMemcpy(dfc1, a.fc1, w1, cudaMemcpyHostToDevice));
          CUDA_OK(cudaMemcpy(dfc2, a.fc2, w2, cudaMemcpyHostToDevice));
          const size_t bytes = cuda::moe_experts_workspace_bytes(T, k, D, H, E);
          CUDA_OK(cudaMalloc(&work, bytes));
          CUDA_OK(cudaMemset(work, 0xff, bytes));
          out.poison();
          cpu::MoeExpertsArgs g = a;
          g.x = dx.ptr, g.fc1 = dfc1, g.fc2 = dfc2, g.indices = didx.ptr, g.weights = dwt.ptr, g.out = out.ptr;
          g.fc1_bias = biases ? db1.ptr : nullptr;
          g.fc2_bias = biases ? db2.ptr : nullptr;
          KERNEL_OK(cuda::moe_experts(g, work, nullptr));
          const std::string what = "moe_experts T" + std::to_string(T) + " D" + std::to_string(D) + " H" +
                                   std::to_string(H) + " E" + std::to_string(E) + " k" + std::to_string(k) +
                                   (bf16 ? " bf16" : " f32") + " act" + std::to_string(act) +
                                   (biases ? " biases" : "");
          expect_gpu_close(what, out.download(), want, 1e-4, 0.1 * rms(want.data(), T * D));
          cudaFree(dfc1);
          cudaFree(dfc2);
          cudaFree(work);
        }
      }
    }
  }
  cpu::MoeExpertsArgs bad;
  bad.tokens = 1, bad.dim = 4, bad.hidden = 2, bad.experts = 2, bad.fc1_dtype = DType::q8_0;
  MSSM_CHECK(!cuda::moe_experts(bad, nullptr, nullptr).ok(), "q8_0 expert weights must be refused");
}

}  // namespace

int main() {
  const int code = device_or_exit_code("test_cuda_moe");
  if (code >= 0) return code;
  Rng rng(11);
  test_route(rng);
  test_experts(rng);
  return finish("test_cuda_moe");
}
