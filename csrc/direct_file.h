// direct_file.h: the only place that talks to the OS about files.
//
// DirectFile   read side: O_DIRECT (Linux) / F_NOCACHE (macOS), with a buffered fallback
//              when the filesystem refuses (tmpfs), positional reads with EINTR/short-read loops.
// WritableFile write side for the bundle writer: plain buffered pwrite + fsync, with errors
//              (ENOSPC above all) turned into IoError that names the path.
// Every failure throws IoError carrying path, offset, length and strerror(errno).
#pragma once

#include <cstdint>
#include <string>

#include "common.h"

namespace flashinfer {

class DirectFile {
 public:
  // Opens `path` read-only. With want_direct, bypasses the page cache if the filesystem lets
  // us; otherwise prints ONE warning to stderr and continues buffered (is_direct() == false).
  DirectFile(const std::string& path, bool want_direct);
  ~DirectFile();
  DirectFile(const DirectFile&) = delete;
  DirectFile& operator=(const DirectFile&) = delete;

  // Read exactly `len` bytes at `off` into dst. With is_direct(), dst/len/off must be
  // multiples of alignment(). Thread-safe (pread). EOF before len bytes -> IoError.
  void read_at(void* dst, std::size_t len, uint64_t off) const;

  uint64_t size() const;  // current size on disk (fstat, not cached)
  bool is_direct() const { return direct_; }
  std::size_t alignment() const { return direct_ ? kIoAlignment : 1; }
  const std::string& path() const { return path_; }
  int fd() const { return fd_; }

  // Drop this file's pages from the page cache (for cold-cache benchmarks). Advisory.
  void drop_page_cache() const;

 private:
  std::string path_;
  int fd_ = -1;
  bool direct_ = false;
};

class WritableFile {
 public:
  // Creates or truncates `path` for writing (buffered: the writer streams big chunks).
  explicit WritableFile(const std::string& path);
  ~WritableFile();
  WritableFile(const WritableFile&) = delete;
  WritableFile& operator=(const WritableFile&) = delete;

  // Write exactly `len` bytes at `off`. ENOSPC -> IoError saying the disk is full.
  void write_at(const void* src, std::size_t len, uint64_t off);
  void sync();   // fsync; errors (ENOSPC on delayed allocation, EIO) -> IoError
  void close();  // idempotent; close errors -> IoError
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

}  // namespace flashinfer
