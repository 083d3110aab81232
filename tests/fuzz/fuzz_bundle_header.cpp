// fuzz_bundle_header.cpp: libFuzzer target for the bundle header parser and the reader's open
// path, built with ASan and UBSan from the core's own sources (tests/fuzz/CMakeLists.txt;
// `make fuzz-native`). Coverage-guided on the C++ itself, which atheris cannot see.
//
// One input stands for one ffn_bundles.bin: its bytes but the last are the file's first bytes,
// and the last byte says how long the file is (the rest reads as zeros, a sparse file):
//   mode & 3 = 0   the bytes alone
//              1   the length the header declares (file_bytes): a file the header fits
//              2   one byte short of it (truncated)
//              3   one page longer
//   mode >> 2 = 1  a file on disk ($TMPDIR), opened with direct I/O where the file system
//                  allows it; otherwise a memfd (tmpfs: 20x the inputs a second of ext4,
//                  whose truncations dominate)
// Declared lengths above kMaxFileBytes keep the bytes alone. Each input runs, in order:
//   1. validate_header on the bytes as a struct (no I/O): FormatError, or a header whose
//      every record lies inside the file;
//   2. read_header(path): agrees with 1 (accepts exactly what 1 accepts, the same header);
//   3. BundleReader(path): agrees with 1 (FormatError / IoError otherwise);
//   4. on an open reader with records of at most kMaxRecordBytes: reads of the first and last
//      records and of one part, which must succeed and hold the file's bytes, and reads out
//      of range, which must raise std::invalid_argument before any I/O.
// Anything else (another exception, a disagreement, wrong bytes) aborts: libFuzzer reports
// it as a crash, as it does sanitizer reports, hangs (-timeout) and big allocations
// (-malloc_limit_mb, -rss_limit_mb).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "aligned_buffer.h"
#include "bundle_format.h"
#include "bundle_reader.h"

namespace fi = flashinfer;

namespace {

constexpr uint64_t kMaxFileBytes = uint64_t(1) << 30;   // sparse: holes cost nothing
constexpr uint64_t kMaxRecordBytes = uint64_t(1) << 20;  // the reads of step 4

#define FUZZ_ASSERT(cond, ...)                                                           \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "fuzz_bundle_header: %s:%d: %s\n", __FILE__, __LINE__,        \
                   fi::detail::concat(__VA_ARGS__).c_str());                             \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)

// The scratch files, opened again by the code under test through /proc/self/fd: a memfd, and
// one in $TMPDIR unlinked at once (nothing is left behind when libFuzzer exits mid-run).
struct Scratch {
  int fd = -1;
  std::string path;
  void open_fd(int f) {
    fd = f;
    path = "/proc/self/fd/" + std::to_string(fd);
  }
};
Scratch g_mem, g_disk;
bool g_direct_ok = false;  // the disk file's file system takes O_DIRECT (tmpfs does not)

void open_scratch() {
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/fuzz-bundle-XXXXXX";
  int fd = mkstemp(tmpl.data());
  FUZZ_ASSERT(fd >= 0, "mkstemp(", tmpl, "): ", std::strerror(errno));
  unlink(tmpl.c_str());
  g_disk.open_fd(fd);
  int probe = open(g_disk.path.c_str(), O_RDONLY | O_DIRECT);
  g_direct_ok = probe >= 0;
  if (probe >= 0) close(probe);
  fd = memfd_create("fuzz-bundle", 0);
  g_mem.open_fd(fd >= 0 ? fd : g_disk.fd);  // no memfd: the disk file for everything
}

// Replace a scratch file's contents: `bytes`, then zeros up to `length`.
void write_file(const Scratch& f, const uint8_t* bytes, size_t n, uint64_t length) {
  FUZZ_ASSERT(ftruncate(f.fd, 0) == 0, "ftruncate: ", std::strerror(errno));
  size_t done = 0;
  while (done < n) {
    ssize_t w = pwrite(f.fd, bytes + done, n - done, off_t(done));
    FUZZ_ASSERT(w > 0, "pwrite: ", std::strerror(errno));
    done += size_t(w);
  }
  FUZZ_ASSERT(ftruncate(f.fd, off_t(length)) == 0, "ftruncate: ", std::strerror(errno));
}

uint64_t file_length(const uint8_t* bytes, size_t n, uint8_t mode) {
  uint64_t declared = 0;
  constexpr size_t at = offsetof(fi::BundleHeader, file_bytes);
  if (n >= at + sizeof(declared)) std::memcpy(&declared, bytes + at, sizeof(declared));
  uint64_t want = n;
  switch (mode & 3) {
    case 1: want = declared; break;
    case 2: want = declared - 1; break;  // 0 wraps past the cap: the bytes alone
    case 3: want = declared + 4096; break;
    default: break;
  }
  return want <= kMaxFileBytes ? want : n;
}

// Byte i of the file: the input's bytes, then zeros.
bool holds(const uint8_t* bytes, size_t n, uint64_t off, const uint8_t* got, uint64_t len) {
  for (uint64_t i = 0; i < len; ++i)
    if (got[i] != (off + i < n ? bytes[off + i] : 0)) return false;
  return true;
}

// Step 1: the header as bytes, validated without I/O. True when accepted (then `h` is the
// validated header, version-1 fields filled in).
bool validate_bytes(const uint8_t* bytes, size_t n, uint64_t length, fi::BundleHeader* h) {
  if (length < sizeof(*h)) return false;  // too short to be read at all (steps 2, 3 say so)
  std::memset(h, 0, sizeof(*h));  // the file's first page: the bytes, then zeros
  std::memcpy(h, bytes, std::min(n, sizeof(*h)));
  try {
    fi::validate_header(*h, length, "fuzz");
  } catch (const fi::FormatError&) {
    return false;
  }
  // What the reader relies on: every record inside the file, the parts inside a record.
  FUZZ_ASSERT(h->record_bytes > 0 && h->record_bytes % h->alignment == 0, "record_bytes");
  FUZZ_ASSERT(fi::payload_bytes(*h) <= h->record_bytes, "payload exceeds the record");
  for (uint32_t p = 0; p < h->n_parts; ++p)
    FUZZ_ASSERT(uint64_t(h->part_offset[p]) + h->part_bytes[p] <= h->record_bytes, "part ", p);
  const uint64_t last = fi::bundle_offset(*h, h->n_layers - 1, h->d_ff - 1);
  FUZZ_ASSERT(last + h->record_bytes <= length && last + h->record_bytes == h->file_bytes,
              "the last record ends at ", last + h->record_bytes, ", the file at ", length);
  return true;
}

// Step 4: reads through an open reader.
void read_some(fi::BundleReader& r, const uint8_t* bytes, size_t n) {
  const fi::BundleHeader& h = r.header();
  const uint64_t rb = h.record_bytes;
  fi::AlignedBuffer buf(2 * rb);
  auto* got = buf.as<uint8_t>();

  const int64_t last = int64_t(h.d_ff) - 1;
  const int64_t ids[2] = {last, 0};  // unsorted on purpose; one id when d_ff is 1
  const size_t n_ids = last > 0 ? 2 : 1;
  for (uint32_t layer : {uint32_t(0), h.n_layers - 1}) {
    r.read(layer, ids, n_ids, got, rb);
    for (size_t k = 0; k < n_ids; ++k) {
      const uint64_t off = r.offset(layer, uint32_t(ids[k]));
      FUZZ_ASSERT(holds(bytes, n, off, got + k * rb, rb), "layer ", layer, " neuron ", ids[k],
                  ": the bytes read are not the file's at ", off);
    }
  }
  // The last part of the last neuron alone (the "unbundled" ablation's path).
  const uint32_t part = h.n_parts - 1;
  r.read_parts(h.n_layers - 1, &last, 1, &part, 1, got, rb);
  const uint64_t off = r.offset(h.n_layers - 1, uint32_t(last)) + h.part_offset[part];
  FUZZ_ASSERT(holds(bytes, n, off, got, h.part_bytes[part]), "part ", part, " at ", off);

  // Out of range: refused before any I/O.
  const int64_t bad[1] = {int64_t(h.d_ff)};
  for (int k = 0; k < 2; ++k) {
    bool refused = false;
    try {
      if (k == 0) r.read(h.n_layers, ids, 1, got, rb);
      else r.read(0, bad, 1, got, rb);
    } catch (const std::invalid_argument&) {
      refused = true;
    }
    FUZZ_ASSERT(refused, k == 0 ? "layer n_layers" : "neuron d_ff", " was not refused");
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  open_scratch();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const size_t n = size - 1;  // the file's bytes; data[n] is the mode
  const uint8_t mode = data[n];
  const uint64_t length = file_length(data, n, mode);
  const bool on_disk = (mode >> 2) == 1;
  const Scratch& file = on_disk ? g_disk : g_mem;
  write_file(file, data, n, length);
  const size_t kept = size_t(std::min<uint64_t>(n, length));  // a shorter length cuts them

  fi::BundleHeader h;
  const bool valid = validate_bytes(data, kept, length, &h);

  // Step 2: read_header through the file.
  bool read_ok = false;
  try {
    fi::BundleHeader got = fi::read_header(file.path);
    read_ok = true;
    FUZZ_ASSERT(valid && std::memcmp(&got, &h, sizeof(h)) == 0,
                "read_header accepted a header validate_header ",
                valid ? "read differently" : "refused");
  } catch (const fi::FormatError&) {
  } catch (const fi::IoError&) {
  }
  FUZZ_ASSERT(read_ok == valid, "read_header refused a header validate_header accepted");

  // Step 3: the reader's open (the threads engine: no ring per input).
  fi::ReaderParams params;
  params.engine = "threads";
  params.queue_depth = 2;
  params.use_direct_io = on_disk && g_direct_ok;
  std::unique_ptr<fi::BundleReader> reader;
  try {
    reader = std::make_unique<fi::BundleReader>(file.path, params);
  } catch (const fi::FormatError&) {
  } catch (const fi::IoError&) {
  }
  // Direct I/O refuses records aligned to less than the device's 4096 (a FormatError).
  const bool direct_refuses = params.use_direct_io && valid &&
                              (h.record_bytes % fi::kIoAlignment || h.data_offset % fi::kIoAlignment);
  FUZZ_ASSERT(bool(reader) == (valid && !direct_refuses), "BundleReader ",
              reader ? "opened" : "refused", " a header validate_header ",
              valid ? "accepted" : "refused");
  if (reader) {
    FUZZ_ASSERT(std::memcmp(&reader->header(), &h, sizeof(h)) == 0, "reader's header differs");
    if (h.record_bytes <= kMaxRecordBytes) read_some(*reader, data, kept);
  }
  return 0;
}
