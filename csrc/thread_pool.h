// thread_pool.h: a fixed pool of worker threads with one blocking primitive, parallel_for.
//
// The read engine uses it to keep `queue_depth` preads in flight. The first exception a task
// throws is recorded, no further items are handed out, and parallel_for rethrows it on the
// caller once every joined worker has stopped (no task outlives the call).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
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

}  // namespace flashinfer
