// direct_file.cpp: open/pread/pwrite/fsync wrappers. The ONLY file with OS #ifdefs.
#include "direct_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "failpoints.h"

namespace flashinfer {

namespace {

std::string errno_text(int err) { return std::strerror(err); }

[[noreturn]] void throw_io(const std::string& what, const std::string& path, uint64_t off,
                           std::size_t len, int err) {
  throw IoError(detail::concat(what, " ", path, " at offset ", off, " (", len,
                               " bytes) failed: ", errno_text(err)),
                err, path, int64_t(off));
}

}  // namespace

// ---------------------------------------------------------------------------------------
// DirectFile: open with direct I/O, fall back to buffered when refused
// ---------------------------------------------------------------------------------------

DirectFile::DirectFile(const std::string& path, bool want_direct) : path_(path) {
  int flags = O_RDONLY;
#ifdef O_CLOEXEC
  flags |= O_CLOEXEC;
#endif
#if defined(__linux__)
  if (want_direct) {
    fd_ = ::open(path.c_str(), flags | O_DIRECT);
    // EINVAL: this filesystem does not support O_DIRECT (tmpfs, some FUSE/overlay mounts).
    if (fd_ >= 0) direct_ = true;
    else if (errno != EINVAL)
      throw IoError(detail::concat("cannot open ", path, ": ", errno_text(errno)), errno, path);
  }
#endif
  if (fd_ < 0) {
    fd_ = ::open(path.c_str(), flags);
    if (fd_ < 0)
      throw IoError(detail::concat("cannot open ", path, ": ", errno_text(errno)), errno, path);
#if defined(__APPLE__)
    // macOS has no O_DIRECT; F_NOCACHE asks the unified buffer cache to keep out of the way.
    if (want_direct && fcntl(fd_, F_NOCACHE, 1) == 0) direct_ = true;
#endif
    if (want_direct && !direct_) {
      std::fprintf(stderr,
                   "flashinfer_py: warning: %s: the filesystem refuses direct I/O; falling back "
                   "to buffered I/O; reads will go through the page cache\n",
                   path.c_str());
    }
  }
}

DirectFile::~DirectFile() {
  if (fd_ >= 0) ::close(fd_);
}

void DirectFile::read_at(void* dst, std::size_t len, uint64_t off) const {
  char* p = static_cast<char*>(dst);
  std::size_t done = 0;
  while (done < len) {
    std::size_t want = len - done;
    int fp = 0;
    ssize_t r;
    if (FI_FAILPOINT(failpoints::kPreadError, &fp)) {
      r = -1;
      errno = fp;
    } else {
      if (FI_FAILPOINT(failpoints::kPreadShort, &fp)) want = std::min(want, std::size_t(fp));
      r = ::pread(fd_, p + done, want, static_cast<off_t>(off + done));
    }
    if (r < 0) {
      if (errno == EINTR) continue;
      throw_io("reading", path_, off + done, len - done, errno);
    }
    if (r == 0) {
      throw IoError(detail::concat("reading ", path_, " at offset ", off + done, " (",
                                   len - done, " bytes) hit end of file: the file is ", size(),
                                   " bytes (was it truncated or replaced while open?)"),
                    0, path_, int64_t(off + done));
    }
    done += static_cast<std::size_t>(r);
  }
}

uint64_t DirectFile::size() const {
  struct stat st;
  if (fstat(fd_, &st) != 0)
    throw IoError(detail::concat("cannot stat ", path_, ": ", errno_text(errno)), errno, path_);
  return static_cast<uint64_t>(st.st_size);
}

void DirectFile::drop_page_cache() const {
#if defined(__linux__)
  (void)posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED);
#endif
}

// ---------------------------------------------------------------------------------------
// WritableFile: buffered positional writes for the bundle writer
// ---------------------------------------------------------------------------------------

WritableFile::WritableFile(const std::string& path) : path_(path) {
  int flags = O_WRONLY | O_CREAT | O_TRUNC;
#ifdef O_CLOEXEC
  flags |= O_CLOEXEC;
#endif
  fd_ = ::open(path.c_str(), flags, 0644);
  if (fd_ < 0)
    throw IoError(detail::concat("cannot create ", path, ": ", errno_text(errno)), errno, path);
}

WritableFile::~WritableFile() {
  if (fd_ >= 0) ::close(fd_);
}

void WritableFile::write_at(const void* src, std::size_t len, uint64_t off) {
  FI_CHECK(fd_ >= 0, "write to ", path_, " after close");
  const char* p = static_cast<const char*>(src);
  std::size_t done = 0;
  while (done < len) {
    ssize_t r = ::pwrite(fd_, p + done, len - done, static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      if (err == ENOSPC || err == EDQUOT)
        throw IoError(detail::concat("writing ", path_, " at offset ", off + done, " (",
                                     len - done, " bytes) failed: ", errno_text(err),
                                     ": the disk is full; free space or write the bundle "
                                     "file to another disk"),
                    err, path_, int64_t(off + done));
      throw_io("writing", path_, off + done, len - done, err);
    }
    done += static_cast<std::size_t>(r);
  }
}

void WritableFile::sync() {
  FI_CHECK(fd_ >= 0, "sync of ", path_, " after close");
  if (::fsync(fd_) != 0) {
    int err = errno;
    throw IoError(detail::concat("fsync of ", path_, " failed: ", errno_text(err),
                                 err == ENOSPC ? ": the disk is full" : ""),
                  err, path_);
  }
}

void WritableFile::close() {
  if (fd_ < 0) return;
  int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0)
    throw IoError(detail::concat("closing ", path_, " failed: ", errno_text(errno)), errno, path_);
}

}  // namespace flashinfer
