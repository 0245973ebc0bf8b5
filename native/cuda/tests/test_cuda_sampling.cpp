// The CUDA argmax and sampler (sampling.cu) against the CPU kernels (baseline level), on
// sampling_cases.h's cases. argmax: rows of 1 to 70000 logits with ties, NaN and −∞ (a NaN first in
// an all −∞ row), identical indices. sample: 1500 random cases of 3 rows each (vocabularies of 1 to
// 3000), each row with its own draw u (cpu::sampling_draw), the same for both: the tokens must be the
// CPU's. The device's expf may differ from the host's by an ulp or two, which moves a boundary between
// two tokens by about 1e-7 of Z; a draw that close to one is rare (about one in a million), so at most
// 3 of the 4500 rows may differ, and every difference is printed. (The kernels' own code runs on
// emulated blocks in test_sampling_blocks, where the host's expf makes every row the CPU's.)
#include <array>

#include "test_cuda_util.h"
#include "tests/sampling_cases.h"

using namespace mssm;
using namespace mssm::test;

namespace {

void test_argmax(Rng& rng) {
  const auto& ref = reference_kernels();
  for (int64_t vocab : {1, 7, 511, 512, 513, 50280, 70000}) {
    const int64_t rows = 4;
    const auto logits = argmax_case(rng, vocab);
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
    const SamplingCase c = sampling_case(rng, trial, rows, 3000, ref);
    const int64_t V = c.vocab;
    const cpu::SamplingParams& p = c.params;
    DeviceBuffer dl(c.logits), du(c.u);
    DeviceInts dp(c.penalty), out(rows);
    void* work = nullptr;
    CUDA_OK(cudaMalloc(&work, cuda::sample_workspace_bytes(rows, V)));
    cpu::SamplingParams g = p;
    g.penalty_tokens = c.count ? dp.ptr : nullptr;
    KERNEL_OK(cuda::sample(dl.ptr, rows, V, g, du.ptr, out.ptr, work, nullptr));
    cudaFree(work);
    const auto got = out.download();
    for (int64_t r = 0; r < rows; ++r) {
      ++total;
      if (got[r] != c.want[r]) {
        ++differ;
        std::printf("  sample trial %d row %lld (V %lld, T %.2f, top_k %d, top_p %.2f, min_p %.2f, u %.7f): got %d, the "
                    "CPU %d\n",
                    trial, (long long)r, (long long)V, p.temperature, p.top_k, p.top_p, p.min_p, c.u[r], got[r],
                    c.want[r]);
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
