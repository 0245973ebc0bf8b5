#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MSSM_PAUSE() _mm_pause()
#else
#define MSSM_PAUSE() std::this_thread::yield()
#endif

namespace mssm {

namespace {

thread_local int t_index = 0;
thread_local bool t_in_worker = false;

class Pool {
 public:
  explicit Pool(int n) : n_(n < 1 ? 1 : n) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_.store(true, std::memory_order_release);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_; }

  // Split into parts of at least min_chunk rows; chunk > 0: the parts are taken chunk by chunk, and
  // a thread that runs out takes the others' (parallel_for_dynamic).
  void run(int64_t count, int64_t min_chunk, int64_t chunk, RangeFn fn, void* ctx) {
    if (min_chunk < 1) min_chunk = 1;
    int64_t parts = count / min_chunk;
    if (parts > n_) parts = n_;
    if (parts <= 1 || t_in_worker) {
      fn(ctx, 0, count);
      return;
    }
    std::lock_guard<std::mutex> run_lock(run_mu_);  // one job at a time (callers from other threads wait)
    fn_ = fn;
    ctx_ = ctx;
    count_ = count;
    parts_ = (int)parts;
    chunk_ = chunk;
    if (chunk > 0) {
      // Each part starts as the static split's share, in chunks; its owner takes them from the front,
      // a thread that ran out of its own takes them from the back.
      const int64_t chunks = (count + chunk - 1) / chunk;
      for (int i = 0; i < parts_; ++i)
        ranges_[i].v.store(pack(chunks * i / parts_, chunks * (i + 1) / parts_), std::memory_order_relaxed);
    }
    // Every worker acknowledges every job, idle ones too: the next job may only overwrite these
    // fields once no worker can still be reading them for this one.
    pending_.store(n_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    t_in_worker = true;
    t_index = 0;
    if (chunk > 0)
      run_chunks(0);
    else
      fn(ctx, 0, count / parts);
    t_in_worker = false;
    // Spin briefly for the other parts, then yield: when the machine has more runnable threads than
    // cores, a worker may need this core to finish.
    for (int spins = 0; pending_.load(std::memory_order_acquire) > 0; ++spins) {
      if (spins < 4000) {
        MSSM_PAUSE();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  void loop(int index) {
    t_in_worker = true;
    t_index = index;
    uint64_t seen = 0;
    for (;;) {
      uint64_t g = generation_.load(std::memory_order_acquire);
      if (g == seen) {
        // Spin a while (the next op of the same step usually follows within microseconds), then
        // yield the core for a while before sleeping, so an oversubscribed machine is not starved.
        int spins = 0;
        while ((g = generation_.load(std::memory_order_acquire)) == seen && spins < 40000) {
          if (spins < 20000) {
            MSSM_PAUSE();
          } else {
            std::this_thread::yield();
          }
          ++spins;
        }
        if (g == seen) {
          std::unique_lock<std::mutex> lock(mu_);
          sleepers_.fetch_add(1, std::memory_order_acq_rel);
          cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_acq_rel);
          g = generation_.load(std::memory_order_acquire);
        }
      }
      seen = g;
      if (stop_.load(std::memory_order_acquire)) return;
      if (chunk_ > 0) {
        if (index < parts_) run_chunks(index);
      } else if (index < parts_) {
        int64_t begin = count_ * index / parts_;
        int64_t end = count_ * (index + 1) / parts_;
        fn_(ctx_, begin, end);
      }
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  // A part's chunks [lo, hi) in one word, so that its owner and a thief agree on who takes the last.
  static uint64_t pack(int64_t lo, int64_t hi) { return (uint64_t)lo << 32 | (uint64_t)hi; }
  static int64_t lo_of(uint64_t r) { return (int64_t)(r >> 32); }
  static int64_t hi_of(uint64_t r) { return (int64_t)(r & 0xffffffffu); }

  void run_chunk(int64_t c) { fn_(ctx_, c * chunk_, std::min(count_, (c + 1) * chunk_)); }

  // Part `own`'s chunks from the front, then the other parts' from the back. The owner's word stays
  // in its cache until a thief comes, so a chunk costs an uncontended compare-exchange.
  void run_chunks(int own) {
    std::atomic<uint64_t>& mine = ranges_[own].v;
    for (uint64_t r = mine.load(std::memory_order_relaxed); lo_of(r) < hi_of(r);) {
      if (mine.compare_exchange_weak(r, pack(lo_of(r) + 1, hi_of(r)), std::memory_order_relaxed))
        run_chunk(lo_of(r));
    }
    for (int k = 1; k < parts_; ++k) {
      std::atomic<uint64_t>& theirs = ranges_[(own + k) % parts_].v;
      for (uint64_t r = theirs.load(std::memory_order_relaxed); lo_of(r) < hi_of(r);) {
        if (theirs.compare_exchange_weak(r, pack(lo_of(r), hi_of(r) - 1), std::memory_order_relaxed))
          run_chunk(hi_of(r) - 1);
      }
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};  // read by spinning workers without the lock
  RangeFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t count_ = 0;
  int parts_ = 0;
  int64_t chunk_ = 0;
  struct alignas(64) Range {  // one cache line each
    std::atomic<uint64_t> v{0};
  };
  std::unique_ptr<Range[]> ranges_{new Range[n_]};  // per part of a chunked job: chunks not yet taken
};

std::mutex g_pool_mu;
Pool* g_pool = nullptr;

Pool& pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (!g_pool) g_pool = new Pool(default_num_threads());
  return *g_pool;
}

}  // namespace

int default_num_threads() {
  const char* env = std::getenv("MAMBA_SSM_THREADS");
  if (env && *env) {
    char* end = nullptr;
    long v = std::strtol(env, &end, 10);
    if (end && *end == 0 && v > 0 && v <= 1024) return (int)v;
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? (int)n : 1;
}

int num_threads() { return pool().size(); }

void set_num_threads(int n) {
  if (n < 1) n = 1;
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (g_pool && g_pool->size() == n) return;
  delete g_pool;
  g_pool = new Pool(n);
}

void parallel_for_raw(int64_t count, int64_t min_chunk, RangeFn fn, void* ctx) {
  if (count <= 0) return;
  pool().run(count, min_chunk, 0, fn, ctx);
}

void parallel_for_dynamic_raw(int64_t count, int64_t min_chunk, int64_t chunk, RangeFn fn, void* ctx) {
  if (count <= 0) return;
  // Chunk indices are kept in 32 bits.
  chunk = std::max<int64_t>({chunk, 1, (count >> 31) + 1});
  pool().run(count, min_chunk, chunk, fn, ctx);
}

int thread_index() { return t_index; }

}  // namespace mssm
