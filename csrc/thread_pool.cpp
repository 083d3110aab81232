// thread_pool.cpp: see thread_pool.h.
#include "thread_pool.h"

#include "common.h"

namespace flashinfer {

ThreadPool::ThreadPool(std::size_t n_threads) {
  FI_CHECK(n_threads > 0 && n_threads <= 1024, "thread count must be in [1, 1024], got ",
           n_threads);
  workers_.reserve(n_threads);
  for (std::size_t i = 0; i < n_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  for (auto& t : workers_) t.join();
}

// ---------------------------------------------------------------------------------------
// worker side
// ---------------------------------------------------------------------------------------

void ThreadPool::run_items() {
  for (;;) {
    if (failed_.load(std::memory_order_relaxed)) return;  // someone failed: stop early
    std::size_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= n_) return;
    try {
      (*fn_)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    // A worker joins a generation only while it still wants workers; the others skip it.
    cv_work_.wait(lk, [&] { return stop_ || (generation_ != seen && joined_ < wanted_); });
    if (stop_) return;
    seen = generation_;
    ++joined_;
    lk.unlock();
    run_items();
    lk.lock();
    if (++finished_ == wanted_) cv_done_.notify_one();
  }
}

// ---------------------------------------------------------------------------------------
// caller side
// ---------------------------------------------------------------------------------------

void ThreadPool::parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn) {
  if (n == 0) return;
  if (n == 1) {  // not worth two context switches
    fn(0);
    return;
  }
  std::lock_guard<std::mutex> call_lk(call_mu_);
  std::exception_ptr err;
  {
    std::unique_lock<std::mutex> lk(mu_);
    fn_ = &fn;
    n_ = n;
    next_.store(0);
    failed_.store(false);
    error_ = nullptr;
    wanted_ = std::min(n, workers_.size());
    joined_ = finished_ = 0;
    ++generation_;
    // notify_one per wanted worker: waking all 32 on a 2-core box costs more than the reads.
    for (std::size_t k = 0; k < wanted_; ++k) cv_work_.notify_one();
    cv_done_.wait(lk, [&] { return finished_ == wanted_; });
    fn_ = nullptr;
    wanted_ = 0;  // stragglers that wake now must not join a finished job
    err = error_;
    error_ = nullptr;
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace flashinfer
