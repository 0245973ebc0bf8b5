// The core pieces every kernel relies on: dtype conversions, the thread pool, level dispatch, large buffers.
#include <atomic>
#include <chrono>
#include <thread>

#include "../core/dtype.h"
#include "../core/large_alloc.h"
#include "test_util.h"

using namespace mssm;
using namespace mssm::test;

int main() {
  // f16: every finite half survives f16 -> f32 -> f16; rounding is to nearest even.
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = f16_to_f32((uint16_t)h);
    if (std::isnan(f)) continue;
    if (f32_to_f16(f) != h) ++bad;
  }
  MSSM_CHECK(bad == 0, "%d halves do not round-trip", bad);
  MSSM_CHECK(f16_to_f32(f32_to_f16(1.0f + 1.0f / 2048)) == 1.0f, "tie rounds to even (down)");
  MSSM_CHECK(f16_to_f32(f32_to_f16(1.0f + 3.0f / 2048)) == 1.0f + 2.0f / 1024, "tie rounds to even (up)");
  MSSM_CHECK(std::isinf(f16_to_f32(f32_to_f16(70000.0f))), "overflow gives infinity");
  MSSM_CHECK(f16_to_f32(f32_to_f16(5.9604645e-08f)) == 5.9604645e-08f, "smallest subnormal");
  // bf16
  MSSM_CHECK(bf16_to_f32(f32_to_bf16(1.0f)) == 1.0f, "bf16 one");
  MSSM_CHECK(bf16_to_f32(f32_to_bf16(1.00390625f)) == 1.0f, "bf16 tie to even");
  MSSM_CHECK(bf16_to_f32(f32_to_bf16(1.01171875f)) == 1.015625f, "bf16 tie to even (up)");
  MSSM_CHECK(std::isnan(bf16_to_f32(f32_to_bf16(NAN))), "bf16 NaN stays NaN");

  // Thread pool: every index visited exactly once, at several sizes and thread counts.
  for (int threads : {1, 2, 3, 8}) {
    set_num_threads(threads);
    for (int64_t n : {1, 2, 7, 1000, 100003}) {
      std::vector<std::atomic<int>> seen(n);
      // A named function object (an lvalue) works as well as a temporary one.
      auto visit = [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) seen[i].fetch_add(1);
      };
      for (int rep = 0; rep < 50; ++rep) parallel_for(n, visit);
      int64_t wrong = 0;
      for (auto& s : seen) wrong += s.load() != 50;
      MSSM_CHECK(wrong == 0, "threads %d n %lld: %lld indices not visited 50 times", threads, (long long)n,
                 (long long)wrong);
    }
    MSSM_CHECK(num_threads() == threads, "pool size %d", num_threads());
  }
  // Jobs smaller than the pool leave some workers idle; back-to-back jobs of varying sizes must never
  // let a late worker run a part twice or after its caller has returned (each part adds exactly once).
  for (int threads : {5, 16}) {
    set_num_threads(threads);
    int64_t wrong = 0;
    for (int rep = 0; rep < 1500; ++rep) {
      int64_t n = 1 + rep % (threads + 3);
      std::vector<int> hits(n, 0);
      parallel_for(n, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) hits[i] += 1;
      });
      for (int h : hits) wrong += h != 1;
    }
    MSSM_CHECK(wrong == 0, "threads %d: %lld indices visited other than once in back-to-back small jobs", threads,
               (long long)wrong);
  }
  // parallel_for_dynamic: every index once, in whole chunks (the last of the range may be shorter),
  // whatever the chunk, the minimum share and the thread count.
  for (int threads : {1, 2, 3, 8}) {
    set_num_threads(threads);
    for (int64_t n : {1, 2, 7, 1000, 100003}) {
      for (int64_t chunk : {1, 3, 64, 5000}) {
        for (int64_t min_chunk : {1, 100}) {
          std::vector<std::atomic<int>> seen(n);
          std::atomic<int64_t> misshapen{0};
          for (int rep = 0; rep < 5; ++rep) {
            parallel_for_dynamic(n, min_chunk, chunk, [&](int64_t b, int64_t e) {
              // A serial run (one part) is handed the whole range at once.
              const bool whole = b == 0 && e == n;
              if (!whole && (b % chunk != 0 || (e != std::min(n, b + chunk)))) misshapen.fetch_add(1);
              for (int64_t i = b; i < e; ++i) seen[i].fetch_add(1);
            });
          }
          int64_t wrong = 0;
          for (auto& v : seen) wrong += v.load() != 5;
          MSSM_CHECK(wrong == 0 && misshapen.load() == 0,
                     "dynamic: threads %d n %lld chunk %lld min %lld: %lld indices not visited 5 times, %lld "
                     "ranges not one chunk",
                     threads, (long long)n, (long long)chunk, (long long)min_chunk, (long long)wrong,
                     (long long)misshapen.load());
        }
      }
    }
  }
  // A slow thread is helped: with the calling thread sleeping in each of its chunks, the other takes
  // most of the chunks (a static split would leave it half). Timing-based, so three tries.
  {
    set_num_threads(2);
    int64_t best = 0;
    for (int attempt = 0; attempt < 3 && best < 14; ++attempt) {
      std::atomic<int64_t> by_worker{0};
      parallel_for_dynamic(20, 1, 1, [&](int64_t b, int64_t e) {
        if (thread_index() == 0)
          std::this_thread::sleep_for(std::chrono::milliseconds(3));
        else
          by_worker.fetch_add(e - b);
      });
      best = std::max(best, by_worker.load());
    }
    MSSM_CHECK(best >= 14, "dynamic: the fast thread ran only %lld of 20 chunks while the other slept", (long long)best);
  }
  set_num_threads(default_num_threads());

  // Dispatch: baseline always present; the best level is the default.
  MSSM_CHECK(cpu::kernels_for(CpuLevel::baseline) != nullptr, "baseline table");
  MSSM_CHECK(std::string(cpu::kernels_for(best_cpu_level())->level) == cpu_level_name(best_cpu_level()),
             "table of the best level is named after it");
  // The ceilings count the FLOPs they did: 12 chains × iterations × lanes × FLOPs a lane, per thread;
  // bf16 pair dot products only at the level that has them (0 elsewhere).
  for (int lv = 0; lv < kCpuLevelCount; ++lv) {
    const cpu::KernelTable* table = cpu::kernels_for((CpuLevel)lv);
    if (!table) continue;
    const double iterations = 1000, threads = num_threads();
    const double lanes = lv >= (int)CpuLevel::avx512 ? 16 : lv == (int)CpuLevel::avx2 ? 8 : 4;
    MSSM_CHECK(table->fma_peak(1000) == 12 * iterations * lanes * 2 * threads, "%s: fma_peak counts %g FLOPs",
               table->level, table->fma_peak(1000));
    const double bf16 = lv == (int)CpuLevel::avx512bf16 ? 12 * iterations * 16 * 4 * threads : 0;
    MSSM_CHECK(table->bf16_peak(1000) == bf16, "%s: bf16_peak counts %g FLOPs, expected %g", table->level,
               table->bf16_peak(1000), bf16);
  }
  std::printf("best CPU level: %s, threads: %d\n", cpu_level_name(best_cpu_level()), default_num_threads());
  // large_alloc: mappings start on a 2 MiB boundary; a freed one is handed out again for the same size
  // (dirty from large_alloc, cleared from large_alloc_zeroed); other sizes get other memory.
  {
    const size_t bytes = (size_t)3 << 20;
    uint8_t* a = static_cast<uint8_t*>(large_alloc_zeroed(bytes));
    MSSM_CHECK(((uintptr_t)a & (((uintptr_t)2 << 20) - 1)) == 0, "a large mapping starts on a 2 MiB boundary");
    int64_t nonzero = 0;
    for (size_t i = 0; i < bytes; ++i) nonzero += a[i] != 0;
    MSSM_CHECK(nonzero == 0, "a fresh zeroed mapping holds %lld non-zero bytes", (long long)nonzero);
    std::memset(a, 7, bytes);
    large_free(a, bytes);
    uint8_t* b = static_cast<uint8_t*>(large_alloc(bytes));
    MSSM_CHECK(b == a, "the freed mapping is reused for the same size");
    MSSM_CHECK(b[12345] == 7, "large_alloc does not clear a reused mapping");
    large_free(b, bytes);
    uint8_t* c = static_cast<uint8_t*>(large_alloc_zeroed(bytes));
    MSSM_CHECK(c == a, "the freed mapping is reused again");
    nonzero = 0;
    for (size_t i = 0; i < bytes; ++i) nonzero += c[i] != 0;
    MSSM_CHECK(nonzero == 0, "a reused zeroed mapping holds %lld non-zero bytes", (long long)nonzero);
    uint8_t* d = static_cast<uint8_t*>(large_alloc(bytes + ((size_t)1 << 20)));
    MSSM_CHECK(d != c, "another size gets another mapping");
    d[bytes] = 1;
    large_free(d, bytes + ((size_t)1 << 20));
    large_free(c, bytes);
    // Mid-size buffers (a step's logits) are mapped and reused too, without the 2 MiB alignment.
    const size_t logits = 50280 * sizeof(float);
    uint8_t* f = static_cast<uint8_t*>(large_alloc_zeroed(logits));
    std::memset(f, 3, logits);
    large_free(f, logits);
    uint8_t* kept = static_cast<uint8_t*>(large_alloc(logits));
    MSSM_CHECK(kept == f && kept[1000] == 3, "a freed mid-size mapping is kept and reused, not mapped afresh");
    large_free(kept, logits);
    uint8_t* g = static_cast<uint8_t*>(large_alloc_zeroed(logits));
    MSSM_CHECK(g == f, "a freed mid-size mapping is reused for the same size");
    nonzero = 0;
    for (size_t i = 0; i < logits; ++i) nonzero += g[i] != 0;
    MSSM_CHECK(nonzero == 0 && ((uintptr_t)g & 63) == 0, "a reused mid-size zeroed buffer is aligned and zero (%lld)",
               (long long)nonzero);
    large_free(g, logits);
    // Small buffers come from the heap, zeroed on request.
    uint8_t* e = static_cast<uint8_t*>(large_alloc_zeroed(1000));
    nonzero = 0;
    for (size_t i = 0; i < 1000; ++i) nonzero += e[i] != 0;
    MSSM_CHECK(nonzero == 0 && ((uintptr_t)e & 63) == 0, "a small zeroed buffer is aligned and zero");
    large_free(e, 1000);
  }

  return finish("test_smoke");
}
