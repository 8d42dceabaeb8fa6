// A second thread that shares a loop's chunks with the thread that posts it (model/csrc kernels).
//
// claim() reserves the helper (false: another thread holds it; run the work without it); post(n, fn, ctx)
// then hands it chunks 0..n-1 of fn; join() takes whatever chunks the helper has
// not reached, waits for the one it is on, and returns. Between the two the caller may do other work (the
// multi-LoRA deltas run beside the base GEMM that way), or nothing (run = post + join: the GEMM's column
// blocks split over two threads). Where the helper gets no core (one core, or a busy HTTP thread beside
// it) the caller simply does every chunk itself, so the helper can cost a wake-up but never a wait for a
// thread that is not running. Chunks must write disjoint memory; which thread runs one never changes
// what it computes. One job at a time per helper. Each extension that includes this has its own helper
// (internal linkage below: an inline function's static would be one object shared by every extension
// loaded, and the GEMM would find it busy with the multi-LoRA deltas instead of sharing its columns;
// measured served on 2 cores: 8 mixed adapters 541 tok/s with one shared helper, 572-606 with two).
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

namespace loraserve {
namespace {   // internal linkage: one helper per extension (see above)

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class HelperThread {
 public:
  using Fn = void (*)(void* ctx, int64_t chunk);

  static HelperThread& get() {
    static HelperThread* helper = new HelperThread();   // never destroyed: it lives as long as the process
    return *helper;
  }

  // Reserve the helper for one job (post, then join); false while another job holds it.
  bool claim() {
    int idle = kIdle;
    return state_.compare_exchange_strong(idle, kClaimed, std::memory_order_acq_rel);
  }

  // After claim(): hand the helper the job.
  void post(int64_t n, Fn fn, void* ctx) {
    fn_ = fn;
    ctx_ = ctx;
    n_ = n;
    next_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      state_.store(kPosted, std::memory_order_release);
    }
    wake_.notify_one();
  }

  void join() {
    take_chunks();
    int posted = kPosted;                    // a helper that never woke must not start it now
    if (!state_.compare_exchange_strong(posted, kTaken, std::memory_order_acq_rel))
      while (state_.load(std::memory_order_acquire) != kDone) cpu_relax();
    state_.store(kIdle, std::memory_order_release);
  }

  // Give back a claim that posted nothing.
  void release() { state_.store(kIdle, std::memory_order_release); }

 private:
  // kClaimed: a caller holds it and is filling in a job; kPosted: a job waits; kRunning: the helper is on
  // it; kDone: the helper is off it; kTaken: the caller did it all before the helper woke.
  static constexpr int kIdle = 0, kPosted = 1, kRunning = 2, kDone = 3, kTaken = 4, kClaimed = 5;
  static constexpr int kPollUs = 2000;

  HelperThread() : thread_([this] { loop(); }) { thread_.detach(); }

  void take_chunks() {
    for (int64_t i = next_.fetch_add(1, std::memory_order_relaxed); i < n_; i = next_.fetch_add(1, std::memory_order_relaxed))
      fn_(ctx_, i);
  }

  void loop() {
    for (;;) {
      // Poll first, yielding the core to any other runnable thread (the HTTP thread on a small box): jobs
      // come tens to hundreds of microseconds apart within a step, and waking a sleeping thread costs the
      // caller ~10-20 us on a VM. Between steps it goes to sleep.
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kPollUs);
      while (state_.load(std::memory_order_acquire) != kPosted && std::chrono::steady_clock::now() < until)
        sched_yield();
      if (state_.load(std::memory_order_acquire) != kPosted) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [this] { return state_.load(std::memory_order_acquire) == kPosted; });
      }
      int posted = kPosted;
      if (!state_.compare_exchange_strong(posted, kRunning, std::memory_order_acq_rel)) continue;
      take_chunks();
      state_.store(kDone, std::memory_order_release);
    }
  }

  std::atomic<int> state_{kIdle};
  std::atomic<int64_t> next_{0};
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::thread thread_;
};

// body(begin, end) over [0, n) in `runs` contiguous runs (each read front to back, so a kernel's own
// prefetch of what comes next in its run stays useful), shared by the caller and the helper. False (and
// nothing run) where another thread holds the helper.
template <typename F>
bool split_runs(int64_t n, int64_t runs, const F& body) {
  struct Ctx {
    const F* body;
    int64_t n, per;
  };
  Ctx ctx{&body, n, (n + runs - 1) / runs};
  HelperThread& helper = HelperThread::get();
  if (!helper.claim()) return false;
  helper.post((n + ctx.per - 1) / ctx.per, [](void* c, int64_t k) {
    const auto* x = static_cast<const Ctx*>(c);
    (*x->body)(k * x->per, std::min(x->n, (k + 1) * x->per));
  }, &ctx);
  helper.join();
  return true;
}

}  // namespace
}  // namespace loraserve
