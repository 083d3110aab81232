// async_reads.h: reads of neuron records that run while the caller computes (issue 16).
//
//   AsyncReads a(path, params, max_records, n_slots);
//   a.start(slot, layer, ids, n);   // returns at once: a worker thread reads into the slot
//   ... attention, the predictor, the FFN on the rows already cached ...
//   a.wait(slot);                   // blocks until the slot's reads landed; rethrows their error
//   cache.set_source(&a);           // NeuronCache::replace/insert copy those records from here
//
// Each slot owns a staging matrix of max_records whole records (4096-aligned, so direct reads
// land in place) and an id -> record map of the layer it holds. The worker has a BundleReader
// of its own (its own descriptor and io_uring ring or thread pool), so it never waits on the
// lock of the reader the neuron cache uses for what was not read ahead. Jobs run one at a
// time, in start order: the disk is one queue, and a job's reads already keep queue_depth
// requests in flight.
//
// The neuron cache's rows are never written here: a kernel may read them while the worker
// runs. Records reach the rows only through replace/insert on the caller's thread, after
// wait(). A slot's records are found (find) only between its wait() and its next start() or
// release().
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "aligned_buffer.h"
#include "bundle_reader.h"

namespace flashinfer {

class AsyncReads {
 public:
  AsyncReads(const std::string& path, const ReaderParams& params, std::size_t max_records,
             uint32_t n_slots = 2);
  ~AsyncReads();  // lets the job in flight finish, drops the queued ones
  AsyncReads(const AsyncReads&) = delete;
  AsyncReads& operator=(const AsyncReads&) = delete;

  // Queue reading the records of ids[0, n) (layer `layer`, distinct, in range) into `slot`.
  // The slot's previous records are forgotten. Throws std::invalid_argument, before queuing
  // anything, for a busy slot (started and not waited), n > max_records or a bad id.
  void start(uint32_t slot, uint32_t layer, const int64_t* ids, std::size_t n);
  // Block until `slot`'s job is done; rethrow the error its reads hit (the slot then holds
  // nothing). Returns the job's ReadStats (zeros for an idle slot). Idempotent.
  ReadStats wait(uint32_t slot);
  // Forget the records of `slot` (waits for it first if it is in flight; errors are dropped).
  void release(uint32_t slot);

  // The record of `id` (layer `layer`) in a waited slot, or nullptr.
  const char* find(uint32_t layer, int64_t id) const;

  // Nanoseconds the worker spent reading for `slot`'s last job (0 when idle or failed).
  uint64_t busy_ns(uint32_t slot) const;
  uint32_t n_slots() const { return uint32_t(slots_.size()); }
  std::size_t max_records() const { return max_records_; }
  uint64_t record_bytes() const { return reader_.record_bytes(); }
  const BundleReader& reader() const { return reader_; }
  std::size_t nbytes() const;  // staging matrices and maps

 private:
  enum class State { kIdle, kQueued, kDone };
  struct Slot {
    State state = State::kIdle;
    bool waited = false;
    uint32_t layer = 0;
    std::vector<int64_t> ids;
    std::vector<int32_t> index;  // (d_ff,) record index of each id, -1 = not held
    AlignedBuffer staging;       // (max_records, record_bytes); replaced (the old one leaked)
                                 // after a read the device did not answer was abandoned
    ReadStats stats;
    uint64_t busy_ns = 0;
    std::exception_ptr error;
  };
  void worker_loop();
  void forget(Slot& s);  // clear the index (caller holds mu_, the slot is not queued)
  const Slot& at(uint32_t slot) const;

  BundleReader reader_;
  std::size_t max_records_;
  uint32_t d_ff_;
  std::vector<Slot> slots_;

  mutable std::mutex mu_;
  std::condition_variable cv_job_;   // the worker waits for a queued slot or stop
  std::condition_variable cv_done_;  // wait() waits for its slot to be done
  std::deque<uint32_t> queue_;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace flashinfer
