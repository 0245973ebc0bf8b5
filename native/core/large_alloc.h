// Memory for large buffers that are reused from call to call (a model's scratch, a trainer's
// activations, a decode step's logits): 64-byte aligned, contents uninitialised. From 128 KiB up the
// memory is mapped directly and kept for reuse once freed. From 2 MiB up transparent huge pages are
// asked for, so that touching it the first time takes one fault per 2 MiB rather than per 4 KiB (in
// this project's VMs a 4 KiB fault costs several microseconds: a first 512-token prefill spent a third
// of its time faulting in its scratch), and walking it misses the TLB less.
#pragma once
#include <cstddef>

namespace mssm {

// Mappings from 2 MiB up start on a 2 MiB boundary. Freed ones are kept for reuse, a few and up to a
// bound (large_alloc.cpp), because mapping afresh costs a fault per page touched.
//
// Never null: throws std::bad_alloc when the memory cannot be had.
void* large_alloc(size_t bytes);
// The same, zero-filled (fresh pages are; a reused mapping is cleared).
void* large_alloc_zeroed(size_t bytes);
// `bytes` must be the size given to large_alloc or large_alloc_zeroed.
void large_free(void* p, size_t bytes) noexcept;

// One such buffer, owned.
class LargeBuffer {
 public:
  LargeBuffer() = default;
  explicit LargeBuffer(size_t bytes) : data_(large_alloc(bytes)), bytes_(bytes) {}
  ~LargeBuffer() { large_free(data_, bytes_); }
  LargeBuffer(LargeBuffer&& o) noexcept : data_(o.data_), bytes_(o.bytes_) { o.data_ = nullptr, o.bytes_ = 0; }
  LargeBuffer& operator=(LargeBuffer&& o) noexcept {
    if (this != &o) {
      large_free(data_, bytes_);
      data_ = o.data_, bytes_ = o.bytes_;
      o.data_ = nullptr, o.bytes_ = 0;
    }
    return *this;
  }
  LargeBuffer(const LargeBuffer&) = delete;
  LargeBuffer& operator=(const LargeBuffer&) = delete;

  void* data() const { return data_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace mssm
