// async_reads.cpp: a worker thread reading neuron records into staging slots. See
// async_reads.h for the contract.
#include "async_reads.h"

#include <algorithm>
#include <cerrno>

namespace flashinfer {

AsyncReads::AsyncReads(const std::string& path, const ReaderParams& params,
                       std::size_t max_records, uint32_t n_slots)
    : reader_(path, params), max_records_(max_records), d_ff_(reader_.header().d_ff) {
  FI_CHECK(n_slots >= 1 && n_slots <= 16, "n_slots must be in [1, 16], got ", n_slots);
  FI_CHECK(max_records >= 1 && max_records <= d_ff_, "max_records must be in [1, ", d_ff_,
           "] (a layer's neurons), got ", max_records);
  slots_.resize(n_slots);
  for (Slot& s : slots_) {
    s.index.assign(d_ff_, -1);
    s.staging = AlignedBuffer(max_records_ * reader_.record_bytes());
  }
  worker_ = std::thread([this] { worker_loop(); });
}

AsyncReads::~AsyncReads() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    queue_.clear();
  }
  cv_job_.notify_all();
  worker_.join();
}

const AsyncReads::Slot& AsyncReads::at(uint32_t slot) const {
  FI_CHECK(slot < slots_.size(), "slot ", slot, " out of range [0, ", slots_.size(), ")");
  return slots_[slot];
}

void AsyncReads::forget(Slot& s) {
  for (int64_t id : s.ids) s.index[std::size_t(id)] = -1;
  s.ids.clear();
  s.error = nullptr;
  s.stats = ReadStats{};
  s.busy_ns = 0;
  s.waited = false;
  s.state = State::kIdle;
}

void AsyncReads::start(uint32_t slot, uint32_t layer, const int64_t* ids, std::size_t n) {
  at(slot);
  FI_CHECK(layer < reader_.header().n_layers, "layer ", layer, " out of range [0, ",
           reader_.header().n_layers, ")");
  FI_CHECK(n <= max_records_, "cannot read ", n, " records ahead into a slot of ",
           max_records_, "; read at most max_records at a time");
  {
    std::lock_guard<std::mutex> lk(mu_);
    Slot& s = slots_[slot];
    FI_CHECK(s.state != State::kQueued || s.waited,
             "slot ", slot, " is still being read: wait() for it before starting another job");
    FI_CHECK(s.state != State::kDone || s.waited,
             "slot ", slot, "'s last job was never waited for: wait() or release() first");
    forget(s);
    for (std::size_t k = 0; k < n; ++k) {
      FI_CHECK(ids[k] >= 0 && ids[k] < int64_t(d_ff_), "neuron id ", ids[k], " (ids[", k,
               "]) out of range [0, ", d_ff_, ")");
      if (s.index[std::size_t(ids[k])] >= 0) {
        int64_t dup = ids[k];
        forget(s);  // also undoes the index entries set so far
        FI_CHECK(false, "duplicate neuron id ", dup, " in ids");
      }
      s.index[std::size_t(ids[k])] = int32_t(k);
      s.ids.push_back(ids[k]);
    }
    s.layer = layer;
    s.state = State::kQueued;
    queue_.push_back(slot);
  }
  cv_job_.notify_one();
}

void AsyncReads::worker_loop() {
  for (;;) {
    uint32_t slot;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_job_.wait(lk, [this] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      slot = queue_.front();
      queue_.pop_front();
    }
    // The slot is ours until it is marked done: start() refuses a queued slot, and wait()
    // only reads its fields after done.
    Slot& s = slots_[slot];
    uint64_t t0 = now_ns();
    ReadStats rs;
    std::exception_ptr err;
    const uint64_t abandoned = reader_.abandoned();
    try {
      if (!s.ids.empty()) {
        if (s.staging.size() == 0)
          throw IoError(detail::concat("reading ahead stopped after the device failed to answer "
                                       "a read of ", reader_.path(), ": load the model again"),
                        EIO, reader_.path());
        rs = reader_.read(s.layer, s.ids.data(), s.ids.size(), s.staging.data(),
                          reader_.record_bytes());
      }
    } catch (...) {
      err = std::current_exception();
    }
    uint64_t t1 = now_ns();
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (reader_.abandoned() != abandoned) {
        // The kernel may still write into this staging: leak it, never reuse it, and read
        // ahead into a fresh one (if none can be had, the slot refuses new jobs: above).
        s.staging.leak();
        try {
          s.staging = AlignedBuffer(max_records_ * reader_.record_bytes());
        } catch (...) {
        }
      }
      s.stats = rs;
      s.busy_ns = t1 - t0;
      s.error = err;
      s.state = State::kDone;
    }
    cv_done_.notify_all();
  }
}

ReadStats AsyncReads::wait(uint32_t slot) {
  at(slot);
  std::unique_lock<std::mutex> lk(mu_);
  Slot& s = slots_[slot];
  if (s.state == State::kIdle) return ReadStats{};
  cv_done_.wait(lk, [&] { return s.state == State::kDone; });
  s.waited = true;
  if (s.error) {
    std::exception_ptr e = s.error;
    forget(s);
    std::rethrow_exception(e);
  }
  return s.stats;
}

void AsyncReads::release(uint32_t slot) {
  at(slot);
  std::unique_lock<std::mutex> lk(mu_);
  Slot& s = slots_[slot];
  if (s.state == State::kQueued) cv_done_.wait(lk, [&] { return s.state == State::kDone; });
  forget(s);
}

const char* AsyncReads::find(uint32_t layer, int64_t id) const {
  if (id < 0 || id >= int64_t(d_ff_)) return nullptr;
  for (const Slot& s : slots_) {
    // waited first: it is written on this (the caller's) thread only, and a waited slot is
    // one the worker no longer touches until start() queues it again here, so state is read
    // only when no other thread can be writing it (reading it first raced the worker
    // marking an in-flight slot done)
    if (!s.waited || s.state != State::kDone || s.layer != layer) continue;
    int32_t k = s.index[std::size_t(id)];
    if (k >= 0)
      return static_cast<const char*>(s.staging.data()) + uint64_t(k) * reader_.record_bytes();
  }
  return nullptr;
}

uint64_t AsyncReads::busy_ns(uint32_t slot) const { return at(slot).busy_ns; }

std::size_t AsyncReads::nbytes() const {
  std::lock_guard<std::mutex> lk(mu_);  // the worker replaces a staging a device abandoned
  std::size_t b = 0;
  for (const Slot& s : slots_) b += s.staging.size() + 4 * s.index.size() + 8 * s.ids.capacity();
  return b;
}

}  // namespace flashinfer
