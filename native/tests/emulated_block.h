// One thread block of a CUDA kernel body, emulated on the host, for the code that compiles without nvcc
// on native/cuda/block.h's primitives (ssd_backward_block.h, sampling_block.h, moe_block.h,
// gemm_block.h, scan_train_block.h).
//
// Each lane is a coroutine (ucontext) with its own stack, and the lanes run one at a time on the
// calling thread: a lane runs until it reaches a barrier (MSSM_SYNC, or its warp's barrier inside a
// shuffle) or returns, then the next lane in line runs. When the last running lane of a warp reaches
// the warp's barrier, that warp runs again at once, ahead of the lanes still in line, so one warp can
// get several warp barriers ahead of the others, as on a GPU. When no lane is left in line and every
// running lane waits at the block's barrier, they all go on, in the other order. Rounds, the
// stretches between block barriers, alternate ascending and descending lane order, so of any two lanes
// (and any two warps) each runs first in some round: a value read without the barrier that should
// separate it from its write is read unwritten (fill shared memory with NaN first) in one order, and
// a value overwritten while another lane still has to read it is read overwritten in the other. A
// barrier some running lanes never reach (a divergent barrier, undefined on a GPU) is reported, and
// all waiting lanes are released so that the run ends. The lanes never run at the same time, so a
// body's atomics are plain operations here.
#pragma once
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <vector>

#include "cuda/block.h"

namespace mssm::test {

class EmulatedBlock {
 public:
  explicit EmulatedBlock(int lanes)
      : n_(lanes), where_(lanes), exchange_(16 * (size_t)((lanes + 31) / 32 * 32)), contexts_(lanes), stacks_(lanes) {
    // Each lane's stack with a page below it that faults: an overflow stops the test instead of
    // writing over another lane's stack.
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (void*& s : stacks_) {
      s = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (s == MAP_FAILED || mprotect(s, page, PROT_NONE) != 0) {
        std::fprintf(stderr, "EmulatedBlock: could not map the lanes' stacks\n");
        std::abort();
      }
    }
  }
  ~EmulatedBlock() {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (void* s : stacks_) munmap(s, kStackBytes + page);
  }
  EmulatedBlock(const EmulatedBlock&) = delete;
  EmulatedBlock& operator=(const EmulatedBlock&) = delete;

  // Runs body() on every lane; false when a barrier was divergent.
  template <typename Body>
  bool run(const Body& body) {
    body_ = [&body] { body(); };
    for (int r = 0; r < n_; ++r) {
      where_[r] = kRunning;
      getcontext(&contexts_[r]);
      contexts_[r].uc_stack.ss_sp = static_cast<char*>(stacks_[r]) + sysconf(_SC_PAGESIZE);
      contexts_[r].uc_stack.ss_size = kStackBytes;
      contexts_[r].uc_link = &main_;
      makecontext(&contexts_[r], &EmulatedBlock::entry, 0);
    }
    cuda::block::host::Lane& lane = cuda::block::host::lane();
    const cuda::block::host::Lane saved = lane;
    EmulatedBlock* const outer = current();
    current() = this;
    lane.stride = n_, lane.context = this, lane.exchange = exchange_.data();
    lane.sync = &EmulatedBlock::block_barrier, lane.warp_sync = &EmulatedBlock::warp_barrier;
    // Shared memory starts as NaN bytes: the variables declared by earlier runs (a body's first run
    // declares its own as it goes).
    for (const cuda::block::host::SharedRegion& s : cuda::block::host::shared_regions())
      std::memset(s.at, 0xff, s.bytes);
    divergent_ = false, ascending_ = true;
    line_.clear();
    for (int r = 0; r < n_; ++r) line_.push_back(r);
    while (!line_.empty()) {
      while (!line_.empty()) {
        const int r = line_.front();
        line_.pop_front();
        running_ = r;
        lane.rank = r;
        swapcontext(&main_, &contexts_[r]);
        if (where_[r] >= 0) release_warp(where_[r]);
      }
      next_round();
    }
    lane = saved;
    current() = outer;
    return !divergent_;
  }

 private:
  static constexpr int kRunning = -3, kEnded = -2, kAtBlock = -1;  // else: at the barrier of warp where_
  // A lane's stack: the bodies keep a few KiB of locals (the tiles' loaders, kRowTile sums), far below.
  static constexpr size_t kStackBytes = 256 * 1024;

  static EmulatedBlock*& current() {
    static thread_local EmulatedBlock* block = nullptr;
    return block;
  }
  static void entry() {
    EmulatedBlock* self = current();
    self->body_();
    self->where_[self->running_] = kEnded;  // then back to main_ (uc_link)
  }
  void stop_at(int where) {
    where_[running_] = where;
    swapcontext(&contexts_[running_], &main_);
  }
  static void block_barrier(void* context) { static_cast<EmulatedBlock*>(context)->stop_at(kAtBlock); }
  static void warp_barrier(void* context) {
    EmulatedBlock* self = static_cast<EmulatedBlock*>(context);
    self->stop_at(self->running_ / 32);
  }

  // Warp w goes on, ahead of the lanes in line, once every lane of it that has not ended waits at its
  // barrier.
  void release_warp(int w) {
    const int w0 = 32 * w, w1 = std::min(n_, w0 + 32);
    for (int r = w0; r < w1; ++r)
      if (where_[r] != kEnded && where_[r] != w) return;
    // A full-warp shuffle needs all 32 lanes: with some returned (or a block of a partial warp) it is
    // undefined on a GPU.
    for (int r = w0; r < w0 + 32; ++r)
      if (r >= n_ || where_[r] == kEnded) divergent_ = true;
    for (int i = 0; i < w1 - w0; ++i) {
      const int r = ascending_ ? w1 - 1 - i : w0 + i;  // pushed to the front: the round's order
      if (where_[r] == w) where_[r] = kRunning, line_.push_front(r);
    }
  }

  // No lane in line: every waiting lane goes on, in the other order (all of them should be at the
  // block's barrier; anything else is a divergent barrier).
  void next_round() {
    bool ended = false, waiting = false, stuck = false;
    for (int r = 0; r < n_; ++r) {
      ended = ended || where_[r] == kEnded;
      waiting = waiting || where_[r] == kAtBlock;
      stuck = stuck || where_[r] >= 0;
    }
    if (stuck || (waiting && ended)) divergent_ = true;
    ascending_ = !ascending_;
    for (int i = 0; i < n_; ++i) {
      const int r = ascending_ ? i : n_ - 1 - i;
      if (where_[r] == kAtBlock || where_[r] >= 0) where_[r] = kRunning, line_.push_back(r);
    }
  }

  int n_;
  std::vector<int> where_;
  std::vector<unsigned char> exchange_;
  std::vector<ucontext_t> contexts_;
  std::vector<void*> stacks_;  // mappings of a guard page and kStackBytes each
  ucontext_t main_;
  std::function<void()> body_;
  std::deque<int> line_;  // the lanes that run next, in order
  int running_ = 0;
  bool divergent_ = false, ascending_ = true;
};

}  // namespace mssm::test
