// The device's argmax and sampler (native/cuda/sampling_block.h, the code of sampling.cu's kernels),
// run on the host: every row as one emulated block of the kernel's 512 lanes (emulated_block.h, which
// switches lanes at every barrier and warp shuffle in orders that expose a missing barrier), against
// the CPU kernels (baseline level) on sampling_cases.h's cases. The host's expf is the CPU sampler's,
// so the tokens must be the same, row for row: the device's own expf, which may differ by an ulp,
// is left to test_cuda_sampling on a GPU.
#include <cstdio>
#include <vector>

#include "cuda/sampling_block.h"
#include "emulated_block.h"
#include "sampling_cases.h"

using namespace mssm;
using namespace mssm::test;
namespace sp = mssm::cuda::sampling;

int main() {
  const cpu::KernelTable* ref = cpu::kernels_for(CpuLevel::baseline);
  Rng rng(17);
  EmulatedBlock block(sp::kThreads);
  for (int64_t vocab : {1, 7, 511, 512, 513, 5000}) {
    const auto logits = argmax_case(rng, vocab);
    std::vector<int32_t> want(4), got(4, -1);
    ref->argmax(logits.data(), 4, vocab, want.data());
    for (int64_t r = 0; r < 4; ++r)
      MSSM_CHECK(block.run([&] { sp::argmax_row(logits.data(), vocab, got.data(), r); }), "argmax: no divergent barrier");
    for (int64_t r = 0; r < 4; ++r)
      MSSM_CHECK(got[r] == want[r], "argmax vocab %lld row %lld: got %d want %d", (long long)vocab, (long long)r, got[r],
                 want[r]);
  }
  int rows_run = 0;
  for (int trial = 0; trial < 150; ++trial) {
    const int64_t rows = 2;
    const SamplingCase c = sampling_case(rng, trial, rows, 700, *ref);
    const int64_t V = c.vocab;
    const sp::RowParams p{c.params.temperature, c.params.top_p, c.params.min_p, c.params.repetition_penalty,
                          c.params.top_k,       c.count,        c.count ? c.penalty.data() : nullptr};
    std::vector<float> work(rows * 2 * V, NAN);
    std::vector<int32_t> got(rows, -1);
    for (int64_t r = 0; r < rows; ++r) {
      MSSM_CHECK(block.run([&] { sp::sample_row(c.logits.data(), V, p, c.u.data(), got.data(), work.data(), r); }),
                 "sample trial %d: no divergent barrier", trial);
      MSSM_CHECK(got[r] == c.want[r], "sample trial %d row %lld (V %lld, T %.2f, top_k %d, top_p %.2f, min_p %.2f, u %.7f): "
                 "got %d, the CPU %d", trial, (long long)r, (long long)V, c.params.temperature, c.params.top_k,
                 c.params.top_p, c.params.min_p, c.u[r], got[r], c.want[r]);
      ++rows_run;
    }
  }
  std::printf("  %d sampled rows on emulated blocks of %d lanes\n", rows_run, sp::kThreads);
  return finish("test_sampling_blocks");
}
