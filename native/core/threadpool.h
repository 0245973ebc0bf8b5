// A persistent pool of worker threads and parallel_for over a range of rows.
//
// Workers spin briefly between jobs before sleeping, so the consecutive ops of one model step do not
// pay a wake-up each. parallel_for splits rows statically: thread i of n takes [i·count/n,
// (i+1)·count/n). parallel_for_dynamic starts from the same split, in chunks, and lets a thread that
// finishes its share early take the others' last chunks.
// A parallel_for called from inside a worker runs serially on that worker.
#pragma once
#include <cstdint>
#include <type_traits>
#include <utility>

namespace mssm {

// Threads the process may use (sched affinity), or MAMBA_SSM_THREADS when set to a positive integer.
int default_num_threads();
int num_threads();
// Resizes the pool (n >= 1). Not to be called while a parallel_for is running.
void set_num_threads(int n);

using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
// Runs fn over [0, count) split across the pool; chunks never smaller than min_chunk rows.
void parallel_for_raw(int64_t count, int64_t min_chunk, RangeFn fn, void* ctx);

// As parallel_for, but each thread's share is run in chunks of `chunk` rows (the last may be shorter),
// and a thread that finishes its own share takes chunks from the end of the others': a slower or later
// thread gets help. For work whose rows cost the same and whose chunks need no set-up (a decode step's
// matrix-vector products): on this project's VMs one thread of a pair often runs 5–20% slower than the
// other for a while, and a static split waits for it.
void parallel_for_dynamic_raw(int64_t count, int64_t min_chunk, int64_t chunk, RangeFn fn, void* ctx);

template <typename F>
inline void parallel_for_dynamic(int64_t count, int64_t min_chunk, int64_t chunk, F&& fn) {
  using G = std::remove_reference_t<F>;  // F is a reference type when fn is an lvalue
  auto thunk = [](void* ctx, int64_t begin, int64_t end) { (*static_cast<G*>(ctx))(begin, end); };
  parallel_for_dynamic_raw(count, min_chunk, chunk, thunk, (void*)&fn);
}

template <typename F>
inline void parallel_for(int64_t count, int64_t min_chunk, F&& fn) {
  using G = std::remove_reference_t<F>;
  auto thunk = [](void* ctx, int64_t begin, int64_t end) { (*static_cast<G*>(ctx))(begin, end); };
  parallel_for_raw(count, min_chunk, thunk, (void*)&fn);
}

template <typename F>
inline void parallel_for(int64_t count, F&& fn) {
  parallel_for(count, 1, std::forward<F>(fn));
}

// The index of the calling thread within the running parallel_for (0 for the caller), for
// per-thread scratch buffers; and the upper bound on it.
int thread_index();

}  // namespace mssm
