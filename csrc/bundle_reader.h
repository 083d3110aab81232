// bundle_reader.h: parallel reads of neuron records from a bundle file into caller rows.
//
//   BundleReader r(path, params);          // opens (O_DIRECT if possible), validates header
//   r.read(layer, ids, n, dst, stride);    // record of ids[k] -> dst + k*stride
//   r.read_rows(layer, ids, n, rows);      // record of ids[k] -> rows[k] (scattered rows)
//
// A read call sorts the ids, merges neighbours whose gap is <= coalesce_gap_bytes into one
// request (capped at max_read_bytes), and keeps queue_depth requests in flight with either a
// pool of pread threads or io_uring. Runs of consecutive ids whose destination rows are
// consecutive land straight in dst; everything else goes through an aligned scratch buffer.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "aligned_buffer.h"
#include "bundle_format.h"
#include "direct_file.h"
#include "thread_pool.h"

namespace flashinfer {

// Runtime knobs of the reader; every field has a documented default.
struct ReaderParams {
  // "auto" = io_uring when built in and the kernel allows it, else "threads".
  std::string engine = "auto";
  // Requests in flight (threads in the pool, or SQEs in the ring). 32 saturates the VM disk.
  int queue_depth = 32;
  // Bypass the page cache (O_DIRECT / F_NOCACHE); falls back with a warning if refused.
  bool use_direct_io = true;
  // Merge two sorted ids into one read when the bytes between them are <= this. 0 = merge
  // only adjacent records (measured on the dev VM: see benchmarks/RESULTS.md).
  uint64_t coalesce_gap_bytes = 0;
  // Upper bound on one request (bytes), in [4096, 1 GiB]; longer runs are split.
  uint64_t max_read_bytes = 1u << 20;
  // Upper bound on the scratch buffer that gap-merged runs, runs whose rows are not adjacent
  // and unaligned parts are read into before their copies (bytes). A call that needs more is
  // executed in rounds (issue, wait, copy, reuse the scratch); a run bound for scratch is
  // cut to fit it. The bound in force is scratch_cap(): this, or one record if larger, rounded
  // up to 4096 bytes (the buffer's granularity). The memory plan counts it per reader
  // (loader.reader_scratch_bytes).
  uint64_t max_scratch_bytes = 1u << 20;
  // io_uring: a read call whose reads all stay silent this long (ms) cancels them and fails
  // with ETIMEDOUT instead of hanging on a failing device. 0 = wait forever. (The threads
  // engine cannot interrupt a blocked pread.)
  int64_t read_timeout_ms = 60000;
};

// What one read call (or the sum of calls) did.
struct ReadStats {
  uint64_t bytes_requested = 0;  // useful record bytes asked for
  uint64_t bytes_read = 0;       // bytes actually read, including coalesced gaps / padding
  uint64_t reads_issued = 0;     // I/O requests submitted
  uint64_t ns = 0;               // wall time inside read calls, nanoseconds
  uint64_t calls = 0;            // read / read_parts calls
  uint64_t rounds = 0;           // issue-wait-copy rounds (1 per call unless its scratch filled)
  bool direct = false;           // page cache bypassed (false after a buffered fallback)
  void add(const ReadStats& o);
};

class BundleReader {
 public:
  BundleReader(const std::string& path, const ReaderParams& params = {});
  ~BundleReader();
  BundleReader(const BundleReader&) = delete;
  BundleReader& operator=(const BundleReader&) = delete;

  // Record of ids[k] (layer `layer`) -> dst + k*dst_stride, for k in [0, n). Ids may come in
  // any order; duplicates and out-of-range ids are rejected (std::invalid_argument) before
  // any I/O. dst_stride >= record_bytes(). Rows that are aligned (dst and stride multiples of
  // 4096) are read into directly; others are bounced through scratch. Serialised per reader.
  ReadStats read(uint32_t layer, const int64_t* ids, std::size_t n, void* dst,
                 std::size_t dst_stride);
  // The same with a destination per record: record of ids[k] -> rows[k] (the neuron cache
  // reads into the slots evicted neurons freed). Runs of consecutive ids whose rows are
  // adjacent (rows[j] == rows[i] + record_bytes) are still one request.
  ReadStats read_rows(uint32_t layer, const int64_t* ids, std::size_t n, char* const* rows);

  // The "unbundled" ablation: each selected part of each neuron is its own read.
  // Row k of dst = parts[0..n_sel) of ids[k], each part_bytes(p) bytes, back to back.
  ReadStats read_parts(uint32_t layer, const int64_t* ids, std::size_t n, const uint32_t* parts,
                       std::size_t n_sel, void* dst, std::size_t dst_stride);
  ReadStats read_parts_rows(uint32_t layer, const int64_t* ids, std::size_t n,
                            const uint32_t* parts, std::size_t n_sel, char* const* rows);

  // Raw ranges through the same engine, for disk benchmarks (bench-disk, the fio comparison):
  // n reads of `len` bytes, offsets[k] -> slot k % (dst_bytes / len) of dst, one request each,
  // in the given order (no sorting, coalescing or splitting). A dst of a few slots per request
  // in flight is reused round-robin like fio's buffers (its contents are then meaningless);
  // dst_bytes >= n*len keeps every range. With direct I/O, offsets, len and dst must be
  // multiples of 4096; every range must lie inside the file (std::invalid_argument).
  ReadStats read_ranges(const uint64_t* offsets, std::size_t n, std::size_t len, void* dst,
                        std::size_t dst_bytes);

  const BundleHeader& header() const { return header_; }
  uint64_t offset(uint32_t layer, uint32_t neuron) const;
  uint64_t record_bytes() const { return header_.record_bytes; }
  uint64_t part_bytes(uint32_t p) const { return header_.part_bytes[p]; }
  uint64_t part_offset(uint32_t p) const { return header_.part_offset[p]; }
  uint64_t payload_bytes() const { return flashinfer::payload_bytes(header_); }
  bool is_direct() const { return file_.is_direct(); }
  const std::string& engine() const { return engine_; }
  const std::string& path() const { return file_.path(); }
  const ReaderParams& params() const { return params_; }
  // The scratch buffer's bound (see ReaderParams::max_scratch_bytes) and its size now.
  uint64_t scratch_cap() const;
  std::size_t scratch_bytes() const { return scratch_size_.load(std::memory_order_relaxed); }
  // How many times a read was abandoned (io_uring: a read that neither completed nor could
  // be cancelled within read_timeout_ms): the kernel may still write into the destination of
  // such a read at any time, so its owner must never free or reuse that memory. An owner
  // compares this before and after a failed call.
  uint64_t abandoned() const { return abandoned_.load(std::memory_order_relaxed); }
  ReadStats stats() const;
  void reset_stats();
  void drop_page_cache() const { file_.drop_page_cache(); }

 private:
  // One contiguous file range -> one contiguous buffer.
  struct Request {
    uint64_t off;
    std::size_t len;
    char* buf;
  };
  // After the I/O: copy len bytes from scratch to a caller row.
  struct Copy {
    const char* src;
    char* dst;
    std::size_t len;
  };

  void check_ids(uint32_t layer, const int64_t* ids, std::size_t n) const;
  // The entry points' bodies (caller holds mu_).
  ReadStats read_rows_locked(uint32_t layer, const int64_t* ids, std::size_t n,
                             char* const* rows);
  ReadStats read_parts_locked(uint32_t layer, const int64_t* ids, std::size_t n,
                              const uint32_t* parts, std::size_t n_sel, char* const* rows,
                              std::size_t dst_stride);
  void plan_read(uint32_t layer, const int64_t* ids, std::size_t n, char* const* rows);
  // rows[k] = dst + k*stride, for the strided entry points
  char* const* strided_rows(void* dst, std::size_t stride, std::size_t n);
  // Append a request, cut into aligned chunks of at most max_read_bytes (one record can
  // exceed it).
  void add_request(uint64_t off, std::size_t len, char* buf);
  // Planning: `bytes` of scratch for one request; starts a new round when the current one's
  // scratch would pass scratch_cap(). scratch_ must already hold min(total, cap) bytes.
  char* take_scratch(uint64_t bytes);
  void begin_plan();
  void execute();  // per round: issue its reqs_ through the engine, then run its copies_
  ReadStats execute_and_count(uint64_t bytes_requested, uint64_t t0);
  void execute_threads(std::size_t first, std::size_t count);
  void execute_uring(std::size_t first, std::size_t count);
  void abandon_ring();  // io_uring: leak a ring the kernel may still write through
  void new_ring();      // io_uring: a fresh ring, or the thread pool when refused

  ReaderParams params_;
  DirectFile file_;
  BundleHeader header_;
  std::string engine_;
  std::unique_ptr<ThreadPool> pool_;  // threads engine only
  struct Uring;
  std::unique_ptr<Uring> uring_;      // io_uring engine only

  std::mutex mu_;                     // one read call at a time (scratch + plan are shared)
  AlignedBuffer scratch_;
  std::vector<Request> reqs_;
  std::vector<Copy> copies_;
  // (end of reqs_, end of copies_) of every round but the last, which ends with the vectors
  std::vector<std::pair<std::size_t, std::size_t>> rounds_;
  uint64_t scratch_used_ = 0;         // planning: scratch taken in the current round
  // scratch_.size() for scratch_bytes(), which may run while a read (GIL released) grows it
  std::atomic<std::size_t> scratch_size_{0};
  std::atomic<uint64_t> abandoned_{0};  // abandon_ring() calls
  std::vector<std::pair<int64_t, std::size_t>> order_;  // (id, position in caller's ids)
  std::vector<char*> strided_;        // (n,) destination rows of a strided call
  mutable std::mutex stats_mu_;
  ReadStats total_;
};

}  // namespace flashinfer
