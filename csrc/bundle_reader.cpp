// bundle_reader.cpp: plan (sort, coalesce, split) and execute (threads or io_uring) reads of
// neuron records. See bundle_reader.h for the contract.
//
// A call is three steps, all under mu_ (the plan vectors and scratch are per reader):
//   1. check   ids in range, no duplicates        -> std::invalid_argument, no I/O issued
//   2. plan    reqs_   : (file offset, length, buffer) requests, each <= max_read_bytes
//              copies_ : scratch -> caller-row copies to run once every request has landed
//              rounds_ : where the scratch (at most scratch_cap()) is reused
//   3. execute per round: queue_depth requests in flight, then the round's copies; the
//              first error is rethrown
#include "bundle_reader.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "failpoints.h"

#ifdef FLASHINFER_HAVE_IO_URING
#include <liburing.h>
#endif

namespace flashinfer {


void ReadStats::add(const ReadStats& o) {
  bytes_requested += o.bytes_requested;
  bytes_read += o.bytes_read;
  reads_issued += o.reads_issued;
  ns += o.ns;
  calls += o.calls;
  rounds += o.rounds;
  direct = o.direct;
}

// ---------------------------------------------------------------------------------------
// io_uring state (only when built with liburing)
// ---------------------------------------------------------------------------------------

#ifdef FLASHINFER_HAVE_IO_URING
struct BundleReader::Uring {
  io_uring ring;
  explicit Uring(unsigned depth) {
    int rc = io_uring_queue_init(depth, &ring, 0);
    if (rc < 0) throw IoError(detail::concat("io_uring_queue_init(", depth, ") failed: ",
                                             std::strerror(-rc)), -rc);
  }
  ~Uring() { io_uring_queue_exit(&ring); }
};
#else
struct BundleReader::Uring {};
#endif

// ---------------------------------------------------------------------------------------
// open: validate params and header, pick the engine
// ---------------------------------------------------------------------------------------

// A kernel or container that refuses io_uring (seccomp: Docker's default profile; the
// io_uring_disabled sysctl; no file descriptor left) gets the thread pool under engine
// "auto", and the user one line saying so, once per process.
[[maybe_unused]] static void note_io_uring_refused(const char* why) {
  static std::atomic<bool> said{false};
  if (!said.exchange(true))
    std::fprintf(stderr, "flashinfer_py: note: io_uring is unavailable (%s); reading with a "
                 "pool of threads instead\n", why);
}

BundleReader::BundleReader(const std::string& path, const ReaderParams& params)
    : params_(params), file_(path, params.use_direct_io) {
  FI_CHECK(params_.queue_depth >= 1 && params_.queue_depth <= 1024,
           "queue_depth must be in [1, 1024], got ", params_.queue_depth);
  // The upper bound keeps one request's length within io_uring's 32-bit field.
  FI_CHECK(params_.max_read_bytes >= kIoAlignment && params_.max_read_bytes <= kMaxReadBytes,
           "max_read_bytes must be in [", kIoAlignment, ", ", kMaxReadBytes, "] (1 GiB), got ",
           params_.max_read_bytes);
  FI_CHECK(params_.engine == "auto" || params_.engine == "threads" ||
               params_.engine == "io_uring",
           "engine must be \"auto\", \"threads\" or \"io_uring\", got \"", params_.engine, "\"");

  // Header: read through the same descriptor (4096 bytes at 0 is aligned for O_DIRECT).
  AlignedBuffer hb(kHeaderBytes);
  uint64_t size = file_.size();
  FI_FORMAT_CHECK(size >= kHeaderBytes, path, ": file is ", size,
                  " bytes, too small to hold the bundle header; re-run `flashinfer-py "
                  "convert` to rebuild the bundle file");
  file_.read_at(hb.data(), kHeaderBytes, 0);
  std::memcpy(&header_, hb.data(), sizeof(header_));
  validate_header(header_, size, path);
  // The invariant that makes bounce-free O_DIRECT possible (STYLE lesson 4).
  FI_FORMAT_CHECK(!file_.is_direct() || (header_.record_bytes % file_.alignment() == 0 &&
                                         header_.data_offset % file_.alignment() == 0),
                  path, ": records are aligned to ", header_.alignment,
                  " bytes but direct I/O needs ", file_.alignment(),
                  "; re-run `flashinfer-py convert` with alignment 4096, or open the file with "
                  "use_direct_io=False");

#ifdef FLASHINFER_HAVE_IO_URING
  if (params_.engine != "threads") {
    try {
      uring_ = std::make_unique<Uring>(static_cast<unsigned>(params_.queue_depth));
      engine_ = "io_uring";
    } catch (const IoError& e) {
      if (params_.engine == "io_uring") throw;  // asked for it explicitly: say why not
      note_io_uring_refused(e.what());
    }
  }
#else
  FI_CHECK(params_.engine != "io_uring",
           "engine=\"io_uring\" requested but this build has no io_uring support (liburing "
           "was not found at build time); use engine=\"auto\" or \"threads\"");
#endif
  if (!uring_) {
    engine_ = "threads";
    pool_ = std::make_unique<ThreadPool>(static_cast<std::size_t>(params_.queue_depth));
  }
}

BundleReader::~BundleReader() = default;

uint64_t BundleReader::offset(uint32_t layer, uint32_t neuron) const {
  return bundle_offset(header_, layer, neuron);
}

ReadStats BundleReader::stats() const {
  std::lock_guard<std::mutex> lk(stats_mu_);
  ReadStats s = total_;
  s.direct = file_.is_direct();
  return s;
}

void BundleReader::reset_stats() {
  std::lock_guard<std::mutex> lk(stats_mu_);
  total_ = ReadStats{};
}

// ---------------------------------------------------------------------------------------
// step 1: argument checks (before any I/O)
// ---------------------------------------------------------------------------------------

void BundleReader::check_ids(uint32_t layer, const int64_t* ids, std::size_t n) const {
  FI_CHECK(layer < header_.n_layers, "layer ", layer, " out of range [0, ", header_.n_layers,
           ")");
  for (std::size_t k = 0; k < n; ++k)
    FI_CHECK(ids[k] >= 0 && ids[k] < int64_t(header_.d_ff), "neuron id ", ids[k], " (ids[", k,
             "]) out of range [0, ", header_.d_ff, ")");
}

// ---------------------------------------------------------------------------------------
// step 2: plan (sort, coalesce into runs, direct-or-scratch per run)
// ---------------------------------------------------------------------------------------

void BundleReader::plan_read(uint32_t layer, const int64_t* ids, std::size_t n,
                             char* const* rows) {
  const uint64_t rb = header_.record_bytes;
  const std::size_t align = file_.alignment();
  order_.resize(n);
  for (std::size_t k = 0; k < n; ++k) order_[k] = {ids[k], k};
  std::sort(order_.begin(), order_.end());
  for (std::size_t j = 1; j < n; ++j)
    FI_CHECK(order_[j].first != order_[j - 1].first, "duplicate neuron id ", order_[j].first,
             " in ids (at positions ", order_[j - 1].second, " and ", order_[j].second, ")");

  // A run [a, b) of sorted ids is one file range of at most max(max_read_bytes, one record).
  // It is read straight into the rows when it has no gaps, its rows are adjacent in memory
  // in the same order (each rb after the previous) and the first satisfies the alignment;
  // otherwise it lands in scratch, and then it is also at most scratch_cap().
  struct Run {
    std::size_t a, b;
    bool to_scratch;
  };
  std::vector<Run> runs;
  const uint64_t cap = std::max<uint64_t>(params_.max_read_bytes, rb);
  const uint64_t scap = scratch_cap();
  const bool rb_aligned = is_aligned(rb, align);
  std::size_t a = 0;
  while (a < n) {
    bool direct = is_aligned(rows[order_[a].second], align);
    std::size_t b = a + 1;
    while (b < n) {
      uint64_t gap = uint64_t(order_[b].first - order_[b - 1].first - 1) * rb;
      uint64_t span = uint64_t(order_[b].first - order_[a].first + 1) * rb;
      bool stays_direct = direct && rb_aligned && gap == 0 &&
                          rows[order_[b].second] == rows[order_[b - 1].second] + rb;
      if (gap > params_.coalesce_gap_bytes || span > cap || (!stays_direct && span > scap))
        break;
      direct = stays_direct;
      ++b;
    }
    runs.push_back({a, b, !direct});
    a = b;
  }

  uint64_t scratch_bytes = 0;
  for (const Run& r : runs)
    if (r.to_scratch) scratch_bytes += uint64_t(order_[r.b - 1].first - order_[r.a].first + 1) * rb;
  scratch_.reserve(std::min(scratch_bytes, scap));
  scratch_size_.store(scratch_.size(), std::memory_order_relaxed);

  for (const Run& r : runs) {
    uint64_t off = bundle_offset(header_, layer, uint32_t(order_[r.a].first));
    uint64_t span = uint64_t(order_[r.b - 1].first - order_[r.a].first + 1) * rb;
    if (!r.to_scratch) {
      add_request(off, span, rows[order_[r.a].second]);
      continue;
    }
    char* s = take_scratch(span);
    add_request(off, span, s);
    for (std::size_t j = r.a; j < r.b; ++j)
      copies_.push_back({s + uint64_t(order_[j].first - order_[r.a].first) * rb,
                         rows[order_[j].second], rb});
  }
}

uint64_t BundleReader::scratch_cap() const {
  const uint64_t rb = header_.record_bytes;  // a copy: the packed header's field is unaligned
  return align_up(std::max(params_.max_scratch_bytes, rb), kIoAlignment);
}

void BundleReader::begin_plan() {
  reqs_.clear();
  copies_.clear();
  rounds_.clear();
  scratch_used_ = 0;
}

char* BundleReader::take_scratch(uint64_t bytes) {
  if (scratch_used_ > 0 && scratch_used_ + bytes > scratch_.size()) {
    rounds_.push_back({reqs_.size(), copies_.size()});  // this round's copies free the scratch
    scratch_used_ = 0;
  }
  char* s = scratch_.as<char>() + scratch_used_;
  scratch_used_ += bytes;
  return s;
}

// Cut a request longer than max_read_bytes into aligned chunks (one record can exceed it).
void BundleReader::add_request(uint64_t off, std::size_t len, char* buf) {
  const std::size_t chunk = std::max<std::size_t>(
      params_.max_read_bytes / kIoAlignment * kIoAlignment, kIoAlignment);
  while (len > chunk) {
    reqs_.push_back({off, chunk, buf});
    off += chunk;
    buf += chunk;
    len -= chunk;
  }
  reqs_.push_back({off, len, buf});
}

// ---------------------------------------------------------------------------------------
// public entry points
// ---------------------------------------------------------------------------------------

char* const* BundleReader::strided_rows(void* dst, std::size_t stride, std::size_t n) {
  strided_.resize(n);
  for (std::size_t k = 0; k < n; ++k) strided_[k] = static_cast<char*>(dst) + k * stride;
  return strided_.data();
}

ReadStats BundleReader::read(uint32_t layer, const int64_t* ids, std::size_t n, void* dst,
                             std::size_t dst_stride) {
  FI_CHECK(n == 0 || dst_stride >= header_.record_bytes, "destination row stride ", dst_stride,
           " is smaller than record_bytes ", header_.record_bytes);
  std::lock_guard<std::mutex> lk(mu_);
  return read_rows_locked(layer, ids, n, strided_rows(dst, dst_stride, n));
}

ReadStats BundleReader::read_rows(uint32_t layer, const int64_t* ids, std::size_t n,
                                  char* const* rows) {
  std::lock_guard<std::mutex> lk(mu_);
  return read_rows_locked(layer, ids, n, rows);
}

ReadStats BundleReader::read_rows_locked(uint32_t layer, const int64_t* ids, std::size_t n,
                                         char* const* rows) {
  check_ids(layer, ids, n);
  uint64_t t0 = now_ns();
  begin_plan();
  plan_read(layer, ids, n, rows);

  return execute_and_count(uint64_t(n) * header_.record_bytes, t0);
}

ReadStats BundleReader::read_parts(uint32_t layer, const int64_t* ids, std::size_t n,
                                   const uint32_t* parts, std::size_t n_sel, void* dst,
                                   std::size_t dst_stride) {
  std::lock_guard<std::mutex> lk(mu_);
  return read_parts_locked(layer, ids, n, parts, n_sel, strided_rows(dst, dst_stride, n),
                           dst_stride);
}

ReadStats BundleReader::read_parts_rows(uint32_t layer, const int64_t* ids, std::size_t n,
                                        const uint32_t* parts, std::size_t n_sel,
                                        char* const* rows) {
  std::lock_guard<std::mutex> lk(mu_);
  return read_parts_locked(layer, ids, n, parts, n_sel, rows, SIZE_MAX);
}

// rows[k] receives the selected parts of ids[k] back to back; dst_stride is only checked
// (SIZE_MAX: rows of the caller's own size).
ReadStats BundleReader::read_parts_locked(uint32_t layer, const int64_t* ids, std::size_t n,
                                          const uint32_t* parts, std::size_t n_sel,
                                          char* const* rows, std::size_t dst_stride) {
  check_ids(layer, ids, n);
  // where each selected part starts in the record and in a destination row
  std::vector<uint64_t> src_off(n_sel), dst_off(n_sel), len(n_sel);
  uint64_t row_bytes = 0;
  for (std::size_t s = 0; s < n_sel; ++s) {
    FI_CHECK(parts[s] < header_.n_parts, "part index ", parts[s], " out of range [0, ",
             header_.n_parts, ")");
    src_off[s] = part_offset(parts[s]);
    len[s] = part_bytes(parts[s]);
    dst_off[s] = row_bytes;
    row_bytes += len[s];
  }
  FI_CHECK(n == 0 || n_sel == 0 || dst_stride >= row_bytes, "destination row stride ",
           dst_stride, " is smaller than the ", n_sel, " parts' ", row_bytes, " bytes");
  std::vector<int64_t> sorted(ids, ids + n);
  std::sort(sorted.begin(), sorted.end());
  for (std::size_t j = 1; j < n; ++j)
    FI_CHECK(sorted[j] != sorted[j - 1], "duplicate neuron id ", sorted[j], " in ids");

  uint64_t t0 = now_ns();
  begin_plan();
  const uint64_t align = file_.alignment();

  // Aligned span of every part; a part that is not aligned on both ends goes via scratch.
  auto span_of = [&](uint64_t off, uint64_t pb, uint64_t* lo, uint64_t* hi) {
    *lo = off / align * align;
    *hi = align_up(off + pb, align);
  };
  auto direct = [&](uint64_t off, uint64_t pb, uint64_t lo, uint64_t hi, const char* row) {
    return lo == off && hi == off + pb && is_aligned(row, align);
  };
  uint64_t scratch_bytes = 0;
  for (std::size_t k = 0; k < n; ++k)
    for (std::size_t s = 0; s < n_sel; ++s) {
      uint64_t off = bundle_offset(header_, layer, uint32_t(ids[k])) + src_off[s], lo, hi;
      span_of(off, len[s], &lo, &hi);
      if (!direct(off, len[s], lo, hi, rows[k] + dst_off[s])) scratch_bytes += hi - lo;
    }
  scratch_.reserve(std::min(scratch_bytes, scratch_cap()));
  scratch_size_.store(scratch_.size(), std::memory_order_relaxed);
  for (std::size_t k = 0; k < n; ++k)
    for (std::size_t s = 0; s < n_sel; ++s) {
      uint64_t off = bundle_offset(header_, layer, uint32_t(ids[k])) + src_off[s], lo, hi;
      span_of(off, len[s], &lo, &hi);
      char* row = rows[k] + dst_off[s];
      if (direct(off, len[s], lo, hi, row)) {
        add_request(off, std::size_t(len[s]), row);
      } else {
        char* sc = take_scratch(hi - lo);
        add_request(lo, std::size_t(hi - lo), sc);
        copies_.push_back({sc + (off - lo), row, std::size_t(len[s])});
      }
    }

  return execute_and_count(uint64_t(n) * row_bytes, t0);
}

ReadStats BundleReader::read_ranges(const uint64_t* offsets, std::size_t n, std::size_t len,
                                    void* dst, std::size_t dst_bytes) {
  const std::size_t align = file_.alignment();
  const uint64_t size = file_.size();
  FI_CHECK(len > 0 && len <= (std::size_t(1) << 30), "range length must be in (0, 1 GiB], got ",
           len);
  FI_CHECK(n == 0 || (is_aligned(dst, align) && len % align == 0), "direct I/O needs a ",
           align, "-byte aligned destination and length (length ", len, ")");
  const std::size_t slots = dst_bytes / len;
  FI_CHECK(n == 0 || slots > 0, "the destination (", dst_bytes, " bytes) is smaller than one ",
           len, "-byte range");
  for (std::size_t k = 0; k < n; ++k)
    FI_CHECK(offsets[k] % align == 0 && offsets[k] + len <= size, "range ", k, " at offset ",
             offsets[k], " (+", len, " bytes) is unaligned or past the end of ", path(), " (",
             size, " bytes)");
  std::lock_guard<std::mutex> lk(mu_);
  uint64_t t0 = now_ns();
  begin_plan();
  char* out = static_cast<char*>(dst);
  for (std::size_t k = 0; k < n; ++k) reqs_.push_back({offsets[k], len, out + (k % slots) * len});
  return execute_and_count(uint64_t(n) * len, t0);
}

// Issue the planned requests, then account for the call (caller holds mu_).
ReadStats BundleReader::execute_and_count(uint64_t bytes_requested, uint64_t t0) {
  ReadStats st;
  st.bytes_requested = bytes_requested;
  for (const Request& r : reqs_) st.bytes_read += r.len;
  st.reads_issued = reqs_.size();
  st.rounds = rounds_.size() + 1;
  execute();
  st.ns = now_ns() - t0;
  st.calls = 1;
  st.direct = file_.is_direct();
  std::lock_guard<std::mutex> slk(stats_mu_);
  total_.add(st);
  return st;
}

// ---------------------------------------------------------------------------------------
// step 3: execute
// ---------------------------------------------------------------------------------------

// Round by round: a round's copies run before the next round's reads reuse the scratch.
// A failing round throws before later rounds start (their rows are left unwritten).
void BundleReader::execute() {
  std::size_t r0 = 0, c0 = 0;
  for (std::size_t k = 0; k <= rounds_.size(); ++k) {
    auto [r1, c1] = k < rounds_.size() ? rounds_[k]
                                       : std::make_pair(reqs_.size(), copies_.size());
    if (r1 > r0) {
      if (uring_) execute_uring(r0, r1 - r0);
      else execute_threads(r0, r1 - r0);
    }
    for (std::size_t c = c0; c < c1; ++c)
      std::memcpy(copies_[c].dst, copies_[c].src, copies_[c].len);
    r0 = r1;
    c0 = c1;
  }
}

// Threads engine: queue_depth workers each loop over blocking preads.
void BundleReader::execute_threads(std::size_t first, std::size_t count) {
  const Request* reqs = reqs_.data() + first;
  pool_->parallel_for(count, [this, reqs](std::size_t i) {
    const Request& r = reqs[i];
    file_.read_at(r.buf, r.len, r.off);
  });
}

#ifdef FLASHINFER_HAVE_IO_URING
namespace {

constexpr uint64_t kCancelTag = uint64_t(1) << 63;  // user_data of our cancel requests

// The first error of a call; later ones are dropped (the first names the cause).
struct Failure {
  std::string msg;
  int err = 0;
  int64_t off = -1;
  bool empty() const { return msg.empty(); }
  void set(std::string m, int e, int64_t o) {
    if (empty()) msg = std::move(m), err = e, off = o;
  }
};

}  // namespace

// io_uring engine: keep up to queue_depth reads in flight on one thread. A short read is
// resubmitted for the rest; -EAGAIN / -EINTR are retried; the first hard error stops new
// submissions and the reads already submitted are drained.
//
// The invariant: this function never returns, throws, or lets the ring go while the kernel
// still holds one of its reads, since each of them writes into a caller's row or into
// scratch_. The two ways a ring can fail keep it:
//   - the ring refuses a submission: keep reaping what it already holds, then replace it;
//   - nothing completes within read_timeout_ms: cancel every outstanding read and wait once
//     more; a read that even cancelling does not end (a hung device) is abandoned with its
//     ring and the scratch buffer, which are leaked on purpose, and a fresh ring is made.
//     (The caller's rows such a read targets are the caller's to keep: see abandoned().)
void BundleReader::execute_uring(std::size_t first, std::size_t count) {
  io_uring* ring = &uring_->ring;
  const Request* reqs = reqs_.data() + first;
  const std::size_t n = count, depth = std::size_t(params_.queue_depth);
  std::vector<std::size_t> done(n, 0);  // bytes landed per request
  std::vector<char> held(n, 0);         // 1 while request i is prepared or in the kernel
  std::size_t next = 0, inflight = 0;
  int refusals = 0;
  bool cancelled = false, replace = false;
  Failure fail;

  auto prep = [&](std::size_t i) {
    io_uring_sqe* sqe = io_uring_get_sqe(ring);  // never null: inflight <= depth = ring size
    const Request& r = reqs[i];
    io_uring_prep_read(sqe, file_.fd(), r.buf + done[i], unsigned(r.len - done[i]),
                       r.off + done[i]);
    io_uring_sqe_set_data64(sqe, i);
    held[i] = 1;
  };
  auto finish = [&](std::size_t i) {
    held[i] = 0;
    --inflight;
  };
  auto where = [&](std::size_t i) {
    return detail::concat("reading ", path(), " at offset ", reqs[i].off + done[i], " (",
                          reqs[i].len - done[i], " bytes)");
  };
  auto first_held = [&]() {
    return std::size_t(std::find(held.begin(), held.end(), 1) - held.begin());
  };
  // Leave the ring with the reads it still holds (see abandon_ring); failpoint builds note
  // where those reads could still land, for the tests to play the late write.
  auto give_up = [&]() {
#ifdef FLASHINFER_FAILPOINTS
    for (std::size_t k = 0; k < n; ++k)
      if (held[k]) failpoints::record_late_write(reqs[k].buf + done[k], reqs[k].len - done[k]);
#endif
    abandon_ring();
  };

  while (inflight > 0 || (fail.empty() && next < n)) {
    while (fail.empty() && next < n && inflight < depth) {
      prep(next++);
      ++inflight;
    }
    // One syscall: submit what is prepared and wait for at least one completion.
    int rc;
    if (params_.read_timeout_ms > 0) {
      __kernel_timespec ts{params_.read_timeout_ms / 1000,
                           (params_.read_timeout_ms % 1000) * 1000000LL};
      io_uring_cqe* unused = nullptr;
      rc = io_uring_submit_and_wait_timeout(ring, &unused, 1, &ts, nullptr);
    } else {
      rc = io_uring_submit_and_wait(ring, 1);
    }
    int fp = 0;
    if (rc >= 0 && FI_FAILPOINT(failpoints::kUringSubmit, &fp)) rc = -fp;

    if (rc == -ETIME && io_uring_cq_ready(ring) == 0) {
      std::size_t i = first_held();
      if (cancelled || i == n) {  // cancelling did not end them: abandon ring and scratch
        fail.set(detail::concat(where(i < n ? i : 0), " did not complete within ",
                                params_.read_timeout_ms, " ms and could not be cancelled: the "
                                "device may be failing; the read was abandoned"),
                 ETIMEDOUT, i < n ? int64_t(reqs[i].off + done[i]) : -1);
        give_up();
        throw IoError(fail.msg, fail.err, path(), fail.off);
      }
      fail.set(detail::concat(where(i), " did not complete within ", params_.read_timeout_ms,
                              " ms (ReaderParams.read_timeout_ms); cancelled"),
               ETIMEDOUT, int64_t(reqs[i].off + done[i]));
      for (std::size_t k = 0; k < n; ++k) {
        if (!held[k]) continue;
        io_uring_sqe* sqe = io_uring_get_sqe(ring);
        if (sqe == nullptr) {  // the ring is full of cancels: send these first
          io_uring_submit(ring);
          sqe = io_uring_get_sqe(ring);
        }
        if (sqe == nullptr) break;
        io_uring_prep_cancel64(sqe, k, 0);
        io_uring_sqe_set_data64(sqe, kCancelTag | k);
      }
      cancelled = true;
      continue;
    }
    if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
      // The ring refused (not one read): what it already holds still lands in our buffers,
      // so keep reaping; the ring is replaced once it holds nothing.
      fail.set(detail::concat("io_uring_submit on ", path(), " failed: ", std::strerror(-rc)),
               -rc, -1);
      replace = true;
      if (++refusals > 3) {  // it will not even wait: give it up without freeing anything
        give_up();
        throw IoError(fail.msg + "; the ring was abandoned", fail.err, path());
      }
    }

    io_uring_cqe* cqe = nullptr;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
      ++seen;
      uint64_t tag = io_uring_cqe_get_data64(cqe);
      if (tag & kCancelTag) continue;  // a cancel's own completion (also liburing's timeouts)
      std::size_t i = std::size_t(tag);
      int res = cqe->res;
      if (FI_FAILPOINT(failpoints::kUringLost, &fp)) continue;  // never arrives: stays held
      if (FI_FAILPOINT(failpoints::kUringCqeError, &fp)) res = -fp;
      if (res > 0 && FI_FAILPOINT(failpoints::kUringShort, &fp)) res = std::min(res, fp);
      const Request& r = reqs[i];
      if ((res == -EAGAIN || res == -EINTR) && fail.empty()) {
        prep(i);  // transient: same range again
      } else if (res < 0) {
        fail.set(detail::concat(where(i), " failed: ", std::strerror(-res)), -res,
                 int64_t(r.off + done[i]));
        finish(i);
      } else if (res == 0) {
        fail.set(detail::concat(where(i), " hit end of file (was the file truncated or "
                                "replaced while open?)"), 0, int64_t(r.off + done[i]));
        finish(i);
      } else {
        done[i] += std::size_t(res);
        if (done[i] < r.len && fail.empty()) prep(i);  // short read: ask for the rest
        else finish(i);
      }
    }
    io_uring_cq_advance(ring, seen);
  }
  if (replace) new_ring();  // drained: closing the old ring frees nothing in use
  if (!fail.empty()) throw IoError(fail.msg, fail.err, path(), fail.off);
}

// A ring the kernel may still write through: leak it and the scratch buffer (never freed,
// never reused), then continue on a fresh ring. The caller's rows cannot be leaked from here:
// abandoned() counts these events so that each owner of a destination can (AsyncReads leaks
// its slot's staging, NeuronCache its rows, the Python bindings the `out` array).
void BundleReader::abandon_ring() {
  abandoned_.fetch_add(1, std::memory_order_relaxed);
  (void)uring_.release();
  scratch_.leak();
  scratch_size_.store(0, std::memory_order_relaxed);
  new_ring();
}

// A fresh ring of queue_depth entries; the thread pool when the kernel refuses one.
void BundleReader::new_ring() {
  uring_.reset();
  try {
    uring_ = std::make_unique<Uring>(static_cast<unsigned>(params_.queue_depth));
  } catch (const IoError&) {
    engine_ = "threads";
    pool_ = std::make_unique<ThreadPool>(std::size_t(params_.queue_depth));
  }
}
#else
void BundleReader::execute_uring(std::size_t, std::size_t) {}
void BundleReader::abandon_ring() {}
void BundleReader::new_ring() {}
#endif

}  // namespace flashinfer
