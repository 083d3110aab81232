// aligned_buffer.h: RAII owner of one aligned heap allocation (posix_memalign + free).
//
// Every buffer that O_DIRECT reads land in (reader scratch, neuron-cache rows) is one of
// these, aligned to kIoAlignment (4096) so that a read needs no bounce copy.
//
// Buffers of 2 MiB or more start on a 2 MiB boundary and ask for transparent huge pages
// (madvise MADV_HUGEPAGE; most distributions default THP to "madvise"). Measured on the dev
// VM's virtio disk: O_DIRECT reads into huge-page memory ran 1.75x faster at 128 KiB and 1.3x
// at 16 KiB than into 4 KiB pages (one DMA segment per read instead of one per page); see
// benchmarks/RESULTS.md. Advisory: ignored where THP is off or unsupported.
#pragma once

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include "common.h"

namespace flashinfer {

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(std::size_t bytes, std::size_t alignment = kIoAlignment) {
    allocate(bytes, alignment);
  }
  ~AlignedBuffer() { std::free(ptr_); }

  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& o) noexcept { swap(o); }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    AlignedBuffer tmp(std::move(o));
    swap(tmp);
    return *this;
  }

  // Grow to at least `bytes` (contents are NOT preserved); never shrinks. For scratch space.
  void reserve(std::size_t bytes, std::size_t alignment = kIoAlignment) {
    if (bytes > size_) {
      std::free(ptr_);
      ptr_ = nullptr;
      size_ = 0;
      allocate(bytes, alignment);
    }
  }

  void* data() { return ptr_; }
  const void* data() const { return ptr_; }
  template <typename T>
  T* as() { return static_cast<T*>(ptr_); }
  std::size_t size() const { return size_; }

  // Give the memory up without freeing it, leaving this buffer empty: for memory a device may
  // still write into (an abandoned io_uring read), which must never be freed or reused.
  void leak() {
    ptr_ = nullptr;
    size_ = 0;
  }

 private:
  void allocate(std::size_t bytes, std::size_t alignment) {
    if (bytes == 0) return;
    // Round the size up too, so the last aligned read of a span never runs past the end.
    std::size_t rounded = align_up(bytes, alignment);
    const bool huge = rounded >= kHugePage;
    if (huge && alignment < kHugePage) alignment = kHugePage;
    void* p = nullptr;
    if (posix_memalign(&p, alignment, rounded) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge) madvise(p, rounded, MADV_HUGEPAGE);
#endif
    ptr_ = p;
    size_ = rounded;
  }
  void swap(AlignedBuffer& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(size_, o.size_);
  }

  static constexpr std::size_t kHugePage = std::size_t(2) << 20;
  void* ptr_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace flashinfer
