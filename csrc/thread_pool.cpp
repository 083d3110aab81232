// thread_pool.cpp: see thread_pool.h.
#include "thread_pool.h"

#include "common.h"

#include <pthread.h>

#include <algorithm>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FI_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define FI_PAUSE() asm volatile("yield")
#else
#define FI_PAUSE() ((void)0)
#endif

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

// =======================================================================================
// ComputePool
// =======================================================================================

namespace {

// How long an idle worker spins before it sleeps. A decode step calls a kernel every
// 20-100 us (Python in between); waking a sleeping thread costs 5-50 us, more on a busy
// machine. Spinning longer than the gaps only burns a core that another process could use.
constexpr uint64_t kSpinNs = 200'000;

// A caller that waits this long (and three times its own items' mean time) for a worker's
// item after finishing its own: the worker lost its core mid-item. On a machine with more
// runnable threads than cores a second thread then costs more than it gives.
constexpr uint64_t kStallNs = 50'000;
constexpr int64_t kMaxSolo = 4096;  // calls (about 30 decode steps of a small model)

constexpr int kTicketBits = 28;
constexpr uint64_t kTicketMask = (uint64_t(1) << kTicketBits) - 1;

inline uint64_t pack(int threads, int64_t n, int64_t next) {
  return (uint64_t(threads) << (2 * kTicketBits)) | (uint64_t(n) << kTicketBits) |
         uint64_t(next);
}

ComputePool* g_pool = nullptr;
std::once_flag g_atfork_once;

}  // namespace

ComputePool& ComputePool::instance() {
  // A forked child has none of the parent's threads: it starts a pool of its own (the
  // parent's object is abandoned, not destroyed: its mutexes may be held).
  std::call_once(g_atfork_once, [] {
    pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; });
  });
  static std::mutex mu;
  std::lock_guard<std::mutex> lk(mu);
  if (!g_pool) g_pool = new ComputePool();
  return *g_pool;
}

ComputePool::~ComputePool() {
  stop_.store(true);
  {
    std::lock_guard<std::mutex> lk(mu_);
    cv_.notify_all();
  }
  for (auto& t : threads_) t.join();
}

void ComputePool::grow(int n_workers) {
  n_workers = std::min(n_workers, kMaxWorkers);
  if (static_cast<int>(n_workers_.load()) >= n_workers) return;
  std::lock_guard<std::mutex> lk(grow_mu_);
  while (static_cast<int>(threads_.size()) < n_workers) {
    const int index = static_cast<int>(threads_.size());
    threads_.emplace_back([this, index] { worker_loop(index); });
  }
  n_workers_.store(threads_.size());
}

int64_t ComputePool::run_items(int slot) {
  int64_t ran = 0;
  for (;;) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      const int threads = static_cast<int>(t >> (2 * kTicketBits));
      const int64_t n = static_cast<int64_t>((t >> kTicketBits) & kTicketMask);
      const int64_t next = static_cast<int64_t>(t & kTicketMask);
      if (slot >= threads || next >= n) return ran;
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel,
                                        std::memory_order_acquire))
        break;
    }
    const int64_t item = static_cast<int64_t>(t & kTicketMask);
    try {
      call_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), item, slot);
    } catch (...) {
      std::lock_guard<std::mutex> lk(err_mu_);
      if (!error_) error_ = std::current_exception();
    }
    done_.fetch_add(1, std::memory_order_acq_rel);
    ++ran;
  }
}

void ComputePool::worker_loop(int index) {
  uint64_t seen = gen_.load();
  for (;;) {
    // Spin for a new job, then sleep until one comes.
    const uint64_t t0 = now_ns();
    uint32_t spins = 0;
    while (gen_.load(std::memory_order_acquire) == seen && !stop_.load(std::memory_order_relaxed)) {
      FI_PAUSE();
      // Yield now and then: on an idle core that returns at once, on a shared one it hands
      // the core to whoever waits for it (the caller's Python, another process) instead of
      // burning this thread's share of it.
      if (++spins % 16 == 0) std::this_thread::yield();
      if (spins % 256 == 0 && now_ns() - t0 > kSpinNs) {
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1);  // seq_cst: pairs with the caller's gen_ bump, then check
        cv_.wait(lk, [&] { return gen_.load() != seen || stop_.load(); });
        sleepers_.fetch_sub(1);
        break;
      }
    }
    if (stop_.load()) return;
    seen = gen_.load(std::memory_order_acquire);
    run_items(index + 1);
  }
}

void ComputePool::run_erased(int64_t n, int threads, Call call, void* ctx) {
  if (n <= 0) return;
  threads = std::min(threads, kMaxWorkers + 1);
  std::unique_lock<std::mutex> busy(call_mu_, std::defer_lock);
  if (threads <= 1 || n <= 1 || !busy.try_lock() || (solo_calls_ > 0 && solo_calls_--)) {
    if (busy.owns_lock()) solo_.fetch_add(1, std::memory_order_relaxed);
    for (int64_t i = 0; i < n; ++i) call(ctx, i, 0);
    return;
  }
  shared_.fetch_add(1, std::memory_order_relaxed);
  FI_CHECK(n <= static_cast<int64_t>(kTicketMask), "too many work items: ", n);
  grow(threads - 1);
  call_.store(call, std::memory_order_relaxed);
  ctx_.store(ctx, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  ticket_.store(pack(threads, n, 0), std::memory_order_release);
  gen_.fetch_add(1);  // seq_cst, then read sleepers_ (see worker_loop)
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lk(mu_);
    cv_.notify_all();
  }
  const uint64_t t0 = now_ns();
  const int64_t mine = run_items(0);
  // Every item is claimed; wait for those still running on workers (a worker that has not
  // claimed one by now never will). A stall: waiting longer than kStallNs and than three of
  // the caller's own items took (a worker may well be mid-way through a long one).
  const uint64_t t1 = now_ns();
  const uint64_t stall_ns =
      std::max<uint64_t>(kStallNs, mine ? 3 * (t1 - t0) / uint64_t(mine) : 0);
  uint32_t spins = 0;
  uint64_t wait0 = 0;
  bool stalled = false;
  while (done_.load(std::memory_order_acquire) < n) {
    FI_PAUSE();
    if (++spins % 64 == 0) {
      const uint64_t now = now_ns();
      if (!wait0) wait0 = now;
      if (now - wait0 > stall_ns) {  // its core went to someone else: let it have ours
        stalled = true;
        std::this_thread::yield();
      }
    }
  }
  if (stalled) {
    stalls_.fetch_add(1, std::memory_order_relaxed);
    backoff_ = std::min(kMaxSolo, std::max<int64_t>(16, 2 * backoff_));
    solo_calls_ = backoff_;
  } else {
    backoff_ /= 2;
  }
  std::exception_ptr err;
  {
    std::lock_guard<std::mutex> lk(err_mu_);
    err = error_;
    error_ = nullptr;
  }
  busy.unlock();
  if (err) std::rethrow_exception(err);
}

}  // namespace flashinfer
