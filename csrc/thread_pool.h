// thread_pool.h: the core's two thread pools.
//
// ThreadPool: a fixed pool of worker threads with one blocking primitive, parallel_for. The
// read engine uses it to keep `queue_depth` preads in flight. The first exception a task
// throws is recorded, no further items are handed out, and parallel_for rethrows it on the
// caller once every joined worker has stopped (no task outlives the call).
//
// ComputePool: the compute kernels' pool (linear, ffn_rows, ...), one per process. A decode
// step makes ~150 kernel calls of 20-100 us each, so what matters is the cost of a call,
// not of a thread: the caller runs items itself, workers spin briefly between calls instead
// of sleeping, and a call never waits for a worker that has not started an item (on a loaded
// machine a worker may get its core a whole time slice late; OpenMP's join would wait for it,
// here the caller simply does that worker's share). Why not ThreadPool: its workers block in
// preads and the caller sleeps until every worker that joined is done; a spinning pool
// would waste a core there.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace flashinfer {

class ThreadPool {
 public:
  explicit ThreadPool(std::size_t n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  std::size_t size() const { return workers_.size(); }

  // Run fn(i) for i in [0, n) on up to size() workers; blocks until all are done.
  // Calls are serialised (one parallel_for at a time per pool). n <= 1 runs inline.
  void parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn);

 private:
  void worker_loop();
  void run_items();  // claim and run items of the current job until none are left

  std::vector<std::thread> workers_;
  std::mutex call_mu_;  // serialises parallel_for callers

  // Current job, guarded by mu_ (except the atomics).
  std::mutex mu_;
  std::condition_variable cv_work_;  // workers wait for a new generation
  std::condition_variable cv_done_;  // the caller waits for finished_ == wanted_
  const std::function<void(std::size_t)>* fn_ = nullptr;
  std::size_t n_ = 0;
  uint64_t generation_ = 0;
  std::size_t wanted_ = 0;    // workers this job wants (min(n, size()))
  std::size_t joined_ = 0;    // workers that took the job
  std::size_t finished_ = 0;  // joined workers that are done with it
  bool stop_ = false;
  std::atomic<std::size_t> next_{0};   // next item index to hand out
  std::atomic<bool> failed_{false};    // set on the first exception: stop handing out
  std::exception_ptr error_;           // the first exception (guarded by mu_)
};

// ---------------------------------------------------------------------------------------

class ComputePool {
 public:
  // The process-wide pool (created on first use; re-created in a forked child).
  static ComputePool& instance();

  // Run fn(item, slot) for every item in [0, n) on the calling thread and up to threads - 1
  // workers; slot (in [0, threads)) names the thread for per-thread scratch: the caller is
  // slot 0, worker w always slot w + 1. Items are handed out one at a time in order. Returns
  // once every item has run; the first exception any item threw is rethrown here (the
  // other items still run). threads <= 1, n <= 1, or a pool already busy with another
  // caller's job: everything runs on the caller, slot 0.
  template <class F>
  void run(int64_t n, int threads, F&& fn) {
    using Fn = std::remove_reference_t<F>;
    run_erased(n, threads, [](void* ctx, int64_t i, int slot) { (*static_cast<Fn*>(ctx))(i, slot); },
               const_cast<void*>(static_cast<const void*>(&fn)));
  }

  // Workers now started (grown on demand up to threads - 1 of the largest call).
  int workers() const { return static_cast<int>(n_workers_.load()); }

  // Calls shared with workers, calls run on the caller alone because of a recent stall,
  // and stalls (diagnostics for benchmarks and tests).
  struct Stats {
    int64_t shared = 0, solo = 0, stalls = 0;
  };
  Stats stats() const { return {shared_.load(), solo_.load(), stalls_.load()}; }

  ~ComputePool();

 private:
  using Call = void (*)(void* ctx, int64_t item, int slot);
  static constexpr int kMaxWorkers = 254;  // threads fit the ticket's 8 bits

  ComputePool() = default;
  void run_erased(int64_t n, int threads, Call call, void* ctx);
  void grow(int n_workers);
  void worker_loop(int index);
  // Claim and run items of the current job as `slot` until none is left for it; returns how
  // many it ran.
  int64_t run_items(int slot);

  // The current job. ticket_ packs (threads:8 | n:28 | next:28): a thread claims item
  // `next` with one compare-exchange, only while next < n and its slot < threads, and reads
  // call_/ctx_ after claiming (a job cannot end, nor the next one start, while an item of it
  // is unfinished, so they are the job's own).
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<Call> call_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::mutex err_mu_;
  std::exception_ptr error_;

  // Wake-up: workers spin on gen_ for a while after each job, then sleep on cv_.
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;

  // Oversubscribed machine: when the caller had to wait for a worker that lost its core in
  // the middle of an item (kStallNs), the next solo_calls_ calls run on the caller alone;
  // the count doubles with every further stall (up to kMaxSolo) and halves after a call
  // whose workers kept up. Guarded by call_mu_.
  int64_t solo_calls_ = 0, backoff_ = 0;
  std::atomic<int64_t> shared_{0}, solo_{0}, stalls_{0};
  std::mutex call_mu_;  // one job at a time; a second concurrent caller runs inline
  std::mutex grow_mu_;
  std::atomic<std::size_t> n_workers_{0};
  std::vector<std::thread> threads_;
};

}  // namespace flashinfer
