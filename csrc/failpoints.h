// failpoints.h: named fault injection in the read path, for the tests (SQLite's testfixture
// idea). Compiled in only with FLASHINFER_FAILPOINTS (CMake option, on for `make test`);
// otherwise FI_FAILPOINT(point, &value) is the constant false and costs nothing.
//
// A test arms a point through _core.testing.arm_failpoint(name, skip, count, value): the
// point lets `skip` evaluations pass, then fires `count` times (-1: until disarmed), each time
// handing `value` (an errno, a byte count) to the code at the point. What a firing point does
// is written where the point is evaluated. They reach what a FUSE file system cannot: an
// io_uring completion carrying an error, a ring that refuses submissions, a completion that
// never arrives.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

namespace flashinfer::failpoints {

enum Point : int {
  kPreadError = 0,  // DirectFile::read_at: pread fails with errno `value`
  kPreadShort,      // DirectFile::read_at: pread returns at most `value` bytes (a short read)
  kUringCqeError,   // io_uring: a read's completion carries -`value` instead of its bytes
  kUringShort,      // io_uring: a read's completion reports at most `value` bytes
  kUringSubmit,     // io_uring: io_uring_submit_and_wait fails with -`value` after submitting
  kUringLost,       // io_uring: a read's completion is withheld, as if it never completed
  kCount
};

inline constexpr const char* kNames[kCount] = {"pread_error", "pread_short", "uring_cqe_error",
                                                 "uring_short", "uring_submit", "uring_lost"};

struct State {
  std::atomic<long> skip{0}, count{0}, fired{0};
  std::atomic<int> value{0};
};

// The reads an abandoned io_uring ring left in the kernel (BundleReader::abandon_ring): the
// kernel may still write their buffers at any time. Failpoint builds record them so a test
// can play that late write (_core.testing.late_writes(byte)) and show nothing the program
// still uses is hit: a device that ignores cancellation cannot be had on demand.
struct LateWrites {
  std::mutex mu;
  std::vector<std::pair<char*, std::size_t>> ranges;
};

struct Shared {
  State states[kCount];
  LateWrites late;
};

// Each extension module links its own copy of the core (_core, and _bookkeeping, whose
// NeuronCache::replace reads through its own copy of the reader's code), so each would have its
// own states. The states are _core's: _bookkeeping points at them when it is imported
// (_core.testing._failpoint_states() hands them over in a capsule named kCapsule).
inline constexpr const char* kCapsule = "flashinfer.failpoints";

inline Shared*& shared_states() {
  static Shared* shared = nullptr;
  return shared;
}

inline Shared* own_states() {
  static Shared states;
  return &states;
}

inline Shared& shared() {
  Shared* s = shared_states();
  return s ? *s : *own_states();
}

inline State& state(int p) { return shared().states[p]; }

inline void record_late_write(char* buf, std::size_t len) {
  LateWrites& l = shared().late;
  std::lock_guard<std::mutex> lk(l.mu);
  l.ranges.emplace_back(buf, len);
}

// Writes `byte` over every recorded range, as the abandoned reads would, and forgets them;
// returns the bytes written.
inline std::size_t play_late_writes(unsigned char byte) {
  LateWrites& l = shared().late;
  std::lock_guard<std::mutex> lk(l.mu);
  std::size_t n = 0;
  for (auto& [buf, len] : l.ranges) {
    std::memset(buf, byte, len);
    n += len;
  }
  l.ranges.clear();
  return n;
}

// True when point `p` fires now; then *value holds the armed value. Thread-safe.
inline bool fire(int p, int* value) {
  State& s = state(p);
  if (s.count.load(std::memory_order_relaxed) == 0) return false;  // the common, disarmed case
  if (s.skip.fetch_sub(1, std::memory_order_acq_rel) > 0) return false;
  long c = s.count.load(std::memory_order_acquire);
  while (c != 0) {
    if (c < 0 || s.count.compare_exchange_weak(c, c - 1, std::memory_order_acq_rel)) {
      s.fired.fetch_add(1, std::memory_order_relaxed);
      *value = s.value.load(std::memory_order_relaxed);
      return true;
    }
  }
  return false;
}

inline void arm(int p, long skip, long count, int value) {
  State& s = state(p);
  s.count.store(0);
  s.value.store(value);
  s.skip.store(skip);
  s.fired.store(0);
  s.count.store(count);
}

}  // namespace flashinfer::failpoints

#ifdef FLASHINFER_FAILPOINTS
#define FI_FAILPOINT(point, value_ptr) ::flashinfer::failpoints::fire(point, value_ptr)
#else
#define FI_FAILPOINT(point, value_ptr) false
#endif
