// common.h: error types, checks and alignment helpers shared by the whole core.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace flashinfer {

// A file that is not what its header / manifest says (bad magic, wrong version,
// truncated, out-of-bounds offset). Surfaces in Python as FlashFormatError(ValueError).
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An operating-system I/O failure (open, pread, io_uring). The message carries path, offset
// and errno text; the fields carry them too, so callers test errno == ENOSPC instead of
// matching text. Surfaces in Python as FlashIOError(OSError) with .errno, .path, .offset.
class IoError : public std::runtime_error {
 public:
  explicit IoError(const std::string& msg, int err = 0, std::string path = {},
                   int64_t offset = -1)
      : std::runtime_error(msg), err_(err), path_(std::move(path)), offset_(offset) {}
  int error_code() const noexcept { return err_; }        // errno; 0: none (e.g. end of file)
  const std::string& path() const noexcept { return path_; }  // empty: not about one file
  int64_t offset() const noexcept { return offset_; }     // -1: not about one offset

 private:
  int err_;
  std::string path_;
  int64_t offset_;
};

// Default direct-I/O alignment: 4096 covers every NVMe / APFS device (512 would do on
// the development VM, but real SSDs want 4 KiB).
constexpr std::size_t kIoAlignment = 4096;
// The longest single read request (ReaderParams::max_read_bytes): io_uring takes 32-bit lengths.
constexpr std::size_t kMaxReadBytes = std::size_t(1) << 30;

inline constexpr std::size_t align_up(std::size_t x, std::size_t a) { return (x + a - 1) / a * a; }
inline constexpr bool is_aligned(std::size_t x, std::size_t a) { return x % a == 0; }
inline bool is_aligned(const void* p, std::size_t a) {
  return reinterpret_cast<std::uintptr_t>(p) % a == 0;
}

// Monotonic clock in nanoseconds, for the statistics every component reports.
inline uint64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

namespace detail {
// The arguments are taken by value: messages name fields of the packed BundleHeader, whose
// 64-bit fields are misaligned, and a reference to one is undefined behaviour (clang's UBSan
// reports it; gcc copies). Only error paths build messages.
template <typename... Args>
std::string concat(Args... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace flashinfer

// FI_CHECK(cond, ...): throw std::invalid_argument (-> Python ValueError) with the message.
#define FI_CHECK(cond, ...)                                                  \
  do {                                                                       \
    if (!(cond)) throw std::invalid_argument(::flashinfer::detail::concat(__VA_ARGS__)); \
  } while (0)

// FI_FORMAT_CHECK(cond, ...): throw FormatError.
#define FI_FORMAT_CHECK(cond, ...)                                                \
  do {                                                                            \
    if (!(cond)) throw ::flashinfer::FormatError(::flashinfer::detail::concat(__VA_ARGS__)); \
  } while (0)
