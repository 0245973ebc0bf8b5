// The CUDA argmax and sampler (sampling.cu) against the CPU kernels (baseline level). argmax: rows of
// 1 to 70000 logits with ties, NaN and −∞ (a NaN first in an all −∞ row), identical indices. sample:
// 1500 random cases of 3 rows each (vocabularies of 1 to 3000, logit scales 0.5 to 10, ties, −∞
// stretches, rows of signed zeros, temperature 0, top_k, top_p, min_p, a repetition penalty with a
// repeated token), each row with its own draw u (cpu::sampling_draw), the same for both: the tokens
// must be the CPU's. The device's expf may differ from the host's by an ulp or two, which moves a
// boundary between two tokens by about 1e-7 of Z; a draw that close to one is rare (about one in a
// million), so at most 3 of the 4500 rows may differ, and every difference is printed. (A host transliteration of the kernel's selection matched the CPU
// sampler on 3000 such cases with no difference.)
#include <array>

#include "test_cuda_util.h"

using namespace mssm;
using namespace mssm::test;

namespace {

void test_argmax(Rng& rng) {
  const auto& ref = reference_kernels();
  for (int64_t vocab : {1, 7, 511, 512, 513, 50280, 70000}) {
    const int64_t rows = 4;
    auto logits = rng.normals(rows * vocab, 3);
    for (int64_t i = 0; i < vocab; i += 3) logits[i] = NAN;                      // row 0: NaN everywhere third
    for (int64_t i = 0; i < vocab; ++i) logits[vocab + i] = -INFINITY;            // row 1: all −∞
    for (int64_t i = 0; i < vocab; i += 2) logits[2 * vocab + i] = 100.0f;         // row 2: ties at the top
    logits[vocab] = NAN;                                                          // row 1: NaN first, then −∞
    if (vocab > 1) logits[3 * vocab + vocab - 1] = 1e30f;                         // row 3: the last wins
    std::vector<int32_t> want(rows);
    ref.argmax(logits.data(), rows, vocab, want.data());
    DeviceBuffer d(logits);
    DeviceInts out(rows);
    KERNEL_OK(cuda::argmax(d.ptr, rows, vocab, out.ptr, nullptr));
    const auto got = out.download();
    for (int64_t r = 0; r < rows; ++r)
      MSSM_CHECK(got[r] == want[r], "argmax vocab %lld row %lld: got %d want %d", (long long)vocab, (long long)r, got[r],
                 want[r]);
  }
}

void test_sample(Rng& rng) {
  const auto& ref = reference_kernels();
  const int64_t rows = 3;
  int differ = 0, total = 0;
  for (int trial = 0; trial < 1500; ++trial) {
    const int64_t V = 1 + (int64_t)(rng.next() % 3000);
    const float scale = trial % 3 == 0 ? 0.5f : trial % 3 == 1 ? 3.0f : 10.0f;
    auto logits = rng.normals(rows * V, scale);
    if (trial % 7 == 0)
      for (int64_t i = 0; i < rows * V; i += 5) logits[i] = logits[0];
    if (trial % 11 == 0)
      for (int64_t i = 1; i < rows * V; i += 3) logits[i] = -INFINITY;
    if (trial % 17 == 0)  // signed zeros compare equal: top_k ties by index, whatever the sign
      for (int64_t i = 0; i < rows * V; ++i) logits[i] = (i % 4 == 0) ? -0.0f : (i % 4 == 1 ? 0.0f : -5.0f);
    cpu::SamplingParams p;
    p.temperature = trial % 13 == 0 ? 0.0f : 0.3f + (float)(rng.next() % 100) / 50.0f;
    p.top_k = trial % 4 == 0 ? 0 : (int32_t)(1 + rng.next() % 60);
    p.top_p = trial % 5 == 0 ? 1.0f : 0.05f + (float)(rng.next() % 95) / 100.0f;
    p.min_p = trial % 6 == 0 ? (float)(rng.next() % 20) / 100.0f : 0.0f;
    const int64_t count = trial % 3 == 0 ? 9 : 0;
    std::vector<int32_t> penalty(rows * count);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < count; ++j) penalty[r * count + j] = j == count - 1 ? penalty[r * count] : (int32_t)(rng.next() % V);
    if (count) p.repetition_penalty = 1.3f;
    std::vector<int32_t> want(rows);
    std::vector<float> u(rows), scratch(2 * V);
    uint64_t rng_state = 977ull * trial + 5;
    for (int64_t r = 0; r < rows; ++r) {
      cpu::SamplingParams pr = p;
      pr.penalty_tokens = count ? penalty.data() + r * count : nullptr;
      pr.penalty_count = count;
      u[r] = cpu::sampling_draw(&rng_state);
      want[r] = ref.sample(logits.data() + r * V, V, pr, u[r], scratch.data());
    }
    DeviceBuffer dl(logits), du(u);
    DeviceInts dp(penalty), out(rows);
    void* work = nullptr;
    CUDA_OK(cudaMalloc(&work, cuda::sample_workspace_bytes(rows, V)));
    cpu::SamplingParams g = p;
    g.penalty_tokens = count ? dp.ptr : nullptr;
    g.penalty_count = count;
    KERNEL_OK(cuda::sample(dl.ptr, rows, V, g, du.ptr, out.ptr, work, nullptr));
    cudaFree(work);
    const auto got = out.download();
    for (int64_t r = 0; r < rows; ++r) {
      ++total;
      if (got[r] != want[r]) {
        ++differ;
        std::printf("  sample trial %d row %lld (V %lld, T %.2f, top_k %d, top_p %.2f, min_p %.2f, u %.7f): got %d, the "
                    "CPU %d\n",
                    trial, (long long)r, (long long)V, p.temperature, p.top_k, p.top_p, p.min_p, u[r], got[r], want[r]);
      }
    }
  }
  MSSM_CHECK(differ <= 3, "sample: %d of %d rows differ from the CPU sampler (at most 3 allowed)", differ, total);
  std::printf("  sample: %d of %d rows differ from the CPU sampler\n", differ, total);
}

}  // namespace

int main() {
  const int code = device_or_exit_code("test_cuda_sampling");
  if (code >= 0) return code;
  Rng rng(13);
  test_argmax(rng);
  test_sample(rng);
  return finish("test_cuda_sampling");
}
