// The device's mixture-of-experts kernels (native/cuda/moe_block.h and gemm_block.h, the code of
// moe.cu's kernels and of the grouped products), run on the host, the blocks with barriers emulated on
// their kernels' 256 lanes (emulated_block.h):
//  - the grouping of pairs by expert (the count pass, the prefix sums as moe.cu's prefix kernel makes
//    them, the place pass) against a counting sort written here: each expert's pairs in (token, slot)
//    order, the offsets their running counts, position the inverse of pair, and pairs routed outside
//    [0, E) left out (position -1); 1 to 700 tokens (over several 256-token rounds), top_k 1 to 3, 1
//    to 9 experts, routings that favour one expert, and indices of -1 and E;
//  - the router against the CPU's (cpu::KernelTable::moe_route): the same experts, weights within 1e-6;
//  - the whole experts block in moe.cu's order (fill, group, prefix, group, gather, the grouped fc1
//    product, GLU, the grouped fc2 product, combine) against cpu::KernelTable::moe_experts: softmax and
//    sigmoid routing, top_k above the experts, every activation, f32 and bf16 weights, with and
//    without biases, the skinny and the tiled product; within 1e-5 of |want| + RMS(want).
#include <algorithm>
#include <cmath>
#include <vector>

#include "cuda/gemm_block.h"
#include "cuda/moe_block.h"
#include "emulated_gemm.h"
#include "test_util.h"

using namespace mssm;
using namespace mssm::test;

namespace {

namespace g = mssm::cuda::gemm;
namespace moe = mssm::cuda::moe;
using cuda::block::HostBf16;

// The grouping of moe.cu: fill, count pass, prefix, place pass.
void group(EmulatedBlock& block, const std::vector<int32_t>& indices, int64_t tokens, int64_t top_k, int64_t E,
           std::vector<int64_t>& offsets, std::vector<int64_t>& pair, std::vector<int64_t>& position) {
  std::fill(position.begin(), position.end(), -1);
  for (int e = 0; e < (int)E; ++e)
    MSSM_CHECK(block.run([&] { moe::group_block(indices.data(), tokens, top_k, offsets.data(), pair.data(),
                                                position.data(), false, e); }),
               "count pass: no divergent barrier");
  offsets[0] = 0;  // moe.cu's prefix kernel
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  for (int e = 0; e < (int)E; ++e)
    MSSM_CHECK(block.run([&] { moe::group_block(indices.data(), tokens, top_k, offsets.data(), pair.data(),
                                                position.data(), true, e); }),
               "place pass: no divergent barrier");
}

struct ExpertsCase {
  int64_t tokens, dim, hidden, experts, top_k;
  cpu::MoeScoring scoring;
  bool renormalize;
  cpu::Activation activation;
  bool bf16, bias;
};

template <typename T>
std::vector<T> weights_as(const std::vector<float>& w) {
  std::vector<T> out(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    if constexpr (sizeof(T) == 4) out[i] = w[i];
    else out[i] = cuda::block::to_bf16(w[i]);
  }
  return out;
}

template <typename T>
void experts_case(Rng& rng, const ExpertsCase& c, EmulatedBlock& block) {
  const int64_t T_ = c.tokens, D = c.dim, H = c.hidden, E = c.experts, k = c.top_k, pairs = T_ * k;
  const cpu::KernelTable& cpu_k = *cpu::kernels_for(CpuLevel::baseline);
  // The router, on the device's code and on the CPU's.
  const std::vector<float> logits = rng.normals(T_ * E, 2.0f);
  std::vector<float> w_dev(pairs), w_cpu(pairs);
  std::vector<int32_t> i_dev(pairs), i_cpu(pairs), counts(E);
  for (int64_t t = 0; t < T_; ++t)
    moe::route_token(logits.data(), E, k, c.scoring == cpu::MoeScoring::softmax, c.renormalize, w_dev.data(),
                     i_dev.data(), t);
  cpu_k.moe_route(logits.data(), T_, E, k, c.scoring, c.renormalize, w_cpu.data(), i_cpu.data(), counts.data());
  double worst_w = 0;
  for (int64_t p = 0; p < pairs; ++p) worst_w = std::max(worst_w, (double)std::fabs(w_dev[p] - w_cpu[p]));
  MSSM_CHECK(i_dev == i_cpu && worst_w <= 1e-6, "route T %lld E %lld k %lld: experts %s, weights within %.3g",
             (long long)T_, (long long)E, (long long)k, i_dev == i_cpu ? "agree" : "differ", worst_w);

  // The experts block on the CPU router's choice.
  const std::vector<float> x = rng.normals(T_ * D), fc1_f = rng.normals(E * 2 * H * D, 0.3f),
                           fc2_f = rng.normals(E * D * H, 0.3f), b1 = rng.normals(E * 2 * H), b2 = rng.normals(E * D);
  const std::vector<T> fc1 = weights_as<T>(fc1_f), fc2 = weights_as<T>(fc2_f);
  cpu::MoeExpertsArgs a;
  a.tokens = T_, a.dim = D, a.hidden = H, a.experts = E, a.top_k = k, a.x = x.data();
  a.fc1 = fc1.data(), a.fc1_dtype = c.bf16 ? DType::bf16 : DType::f32, a.fc1_bias = c.bias ? b1.data() : nullptr;
  a.fc2 = fc2.data(), a.fc2_dtype = a.fc1_dtype, a.fc2_bias = c.bias ? b2.data() : nullptr;
  a.activation = c.activation, a.indices = i_cpu.data(), a.weights = w_cpu.data();
  std::vector<float> want(T_ * D);
  a.out = want.data();
  cpu_k.moe_experts(a);

  // moe.cu's moe_experts, step by step.
  const int64_t max_rows = moe::max_rows(T_, k, E);
  std::vector<int64_t> offsets(E + 1, -7), pair(pairs, -7), position(pairs);
  group(block, i_cpu, T_, k, E, offsets, pair, position);
  std::vector<float> gathered(pairs * D, NAN), fc1_out(pairs * 2 * H, NAN), glu(pairs * H, NAN),
      expert_out(pairs * D, NAN), out(T_ * D, NAN);
  for (int64_t i = 0; i < pairs * D; ++i)
    moe::gather_element(x.data(), pair.data(), offsets[E], k, D, gathered.data(), i);
  const bool skinny = max_rows < kEmulatedSkinnyMaxRows;
  emulated_gemm<T>(block, "fc1", skinny, false, gathered.data(), D, fc1.data(), a.fc1_bias, fc1_out.data(), 2 * H,
                   max_rows, 2 * H, D, g::GemmGroups{offsets.data(), 2 * H * D, 2 * H}, E);
  for (int64_t i = 0; i < pairs * H; ++i) moe::glu_element(fc1_out.data(), offsets[E], H, c.activation, glu.data(), i);
  emulated_gemm<T>(block, "fc2", skinny, false, glu.data(), H, fc2.data(), a.fc2_bias, expert_out.data(), D,
                   max_rows, D, H, g::GemmGroups{offsets.data(), D * H, D}, E);
  for (int64_t i = 0; i < T_ * D; ++i)
    moe::combine_element(expert_out.data(), position.data(), w_cpu.data(), k, D, out.data(), i);

  const std::string what = "experts T " + std::to_string(T_) + " D " + std::to_string(D) + " H " + std::to_string(H) +
                           " E " + std::to_string(E) + " k " + std::to_string(k) + (c.bf16 ? " bf16 " : " f32 ") +
                           (skinny ? "skinny" : "tiled") + (c.bias ? " bias" : "");
  expect_close(what.c_str(), out.data(), want.data(), T_ * D, 1e-5, rms(want.data(), T_ * D));
}

}  // namespace

int main() {
  Rng rng(5);
  EmulatedBlock block(cuda::moe::kGroupThreads);
  int cases = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t tokens = 1 + (int64_t)(rng.next() % (trial < 20 ? 40 : 700));
    const int64_t top_k = 1 + (int64_t)(rng.next() % 3), E = 1 + (int64_t)(rng.next() % 9), pairs = tokens * top_k;
    std::vector<int32_t> indices(pairs);
    for (auto& v : indices) {
      const uint64_t r = rng.next() % 100;
      v = r < 3 ? -1 : r < 6 ? (int32_t)E : r < 40 ? 0 : (int32_t)(rng.next() % E);  // expert 0 favoured
    }
    // The counting sort.
    std::vector<int64_t> want_offsets(E + 1, 0), want_pair, want_position(pairs, -1);
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t p = 0; p < pairs; ++p)
        if (indices[p] == e) want_position[p] = (int64_t)want_pair.size(), want_pair.push_back(p);
      want_offsets[e + 1] = (int64_t)want_pair.size();
    }
    std::vector<int64_t> offsets(E + 1, -7), pair(pairs, -7), position(pairs);
    group(block, indices, tokens, top_k, E, offsets, pair, position);
    const int64_t placed = want_offsets[E];
    MSSM_CHECK(offsets == want_offsets, "trial %d (T %lld, k %lld, E %lld): offsets", trial, (long long)tokens,
               (long long)top_k, (long long)E);
    MSSM_CHECK(std::vector<int64_t>(pair.begin(), pair.begin() + placed) == want_pair, "trial %d: pairs", trial);
    MSSM_CHECK(position == want_position, "trial %d: positions", trial);
    ++cases;
  }
  std::printf("  %d routings grouped on emulated blocks of %d lanes\n", cases, cuda::moe::kGroupThreads);
  using cpu::Activation;
  using cpu::MoeScoring;
  const ExpertsCase experts_cases[] = {
      {7, 24, 16, 4, 2, MoeScoring::softmax, true, Activation::silu, false, true},
      {40, 33, 20, 3, 1, MoeScoring::sigmoid, false, Activation::gelu_tanh, true, false},
      {5, 16, 24, 2, 3, MoeScoring::softmax, false, Activation::gelu, false, true},  // top_k above the experts
      {70, 40, 16, 5, 2, MoeScoring::softmax, true, Activation::silu, true, true},
      {1, 24, 8, 1, 1, MoeScoring::sigmoid, true, Activation::gelu, false, false},
  };
  for (const ExpertsCase& c : experts_cases) {
    if (c.bf16) experts_case<HostBf16>(rng, c, block);
    else experts_case<float>(rng, c, block);
  }
  return finish("test_moe_blocks");
}
