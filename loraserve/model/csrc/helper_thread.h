// A second thread that shares loops' chunks with the thread that posts them (model/csrc kernels).
//
// post(n, fn, ctx) queues a job of chunks 0..n-1 and returns its ticket (-1: every slot is taken; run the
// work without the helper); join(ticket) takes whatever chunks of that job the helper has not reached,
// waits for the one it is on, and returns. The helper works through the queued jobs oldest first. Between
// post and join the caller may do other work: the multi-LoRA deltas are posted before the base GEMM,
// whose own column runs are posted next, so the helper computes the deltas and then joins the GEMM.
// Where the helper gets no core (one core, or a busy HTTP thread beside it) the caller simply does every
// chunk itself, so the helper can cost a wake-up but never a wait for a thread that is not running.
// Chunks must write disjoint memory; which thread runs one never changes what it computes.
//
// Between jobs the helper reads ahead: plan_read_ahead(ranges) names memory a job posted later will read
// (the next projection group's adapters), and the idle helper prefetches it instead of only yielding its
// core, so that job reads from the cache, not from memory.
//
// One helper for all the kernel extensions. Each extension compiles its own HelperThread (internal
// linkage below: an inline function's static would be one object shared by every extension loaded, by
// accident of the linker), and model/kernels.py makes them all use one: `helper_capsule()` of one
// extension, `use_helper(capsule)` on the others. The kernels run one after another on the engine
// thread, and two helpers polling for one core took turns on it: served base SmolLM2 on 2 cores, with
// the GEMM and the decode attention each on its own helper, 774-806 tok/s; on one shared, 842-865.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>

namespace loraserve {
namespace {   // internal linkage: see above

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

using ChunkFn = void (*)(void* ctx, int64_t chunk);

// Bytes a later job will read (plan_read_ahead below).
struct ReadRange {
  const char* p;
  int64_t bytes;
};

class HelperThread {
 public:
  static HelperThread& get() {
    static HelperThread* helper = new HelperThread();   // never destroyed: it lives as long as the process
    return *helper;
  }

  int64_t post(int64_t n, ChunkFn fn, void* ctx) {
    for (int64_t s = 0; s < kSlots; ++s) {
      Slot& slot = slots_[s];
      int free = kFree;
      if (!slot.state.compare_exchange_strong(free, kFilling, std::memory_order_acq_rel)) continue;
      slot.fn = fn;
      slot.ctx = ctx;
      slot.n = n;
      slot.next.store(0, std::memory_order_relaxed);
      slot.order.store(posted_.fetch_add(1, std::memory_order_relaxed), std::memory_order_relaxed);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        slot.state.store(kPosted, std::memory_order_release);
      }
      wake_.notify_one();
      return s;
    }
    return -1;
  }

  void join(int64_t ticket) {
    Slot& slot = slots_[ticket];
    take_chunks(slot);
    int posted = kPosted;                    // a helper that never reached it must not start it now
    if (!slot.state.compare_exchange_strong(posted, kFree, std::memory_order_acq_rel)) {
      while (slot.state.load(std::memory_order_acquire) != kDone) cpu_relax();
      slot.state.store(kFree, std::memory_order_release);
    }
  }

  // Memory a job posted later will read (the multi-LoRA deltas of a layer's next projection group: their
  // inputs are not known yet, their adapters are), for the helper to bring into its cache while it has
  // nothing to compute; replaces the plan before it. Ranges past kPlanRanges are left out.
  void plan_read_ahead(const ReadRange* ranges, int64_t n) {
    n = std::min<int64_t>(n, kPlanRanges);
    plan_seq_.fetch_add(1, std::memory_order_acq_rel);            // odd: being written
    for (int64_t i = 0; i < n; ++i) {
      plan_p_[i].store(ranges[i].p, std::memory_order_relaxed);
      plan_bytes_[i].store(ranges[i].bytes, std::memory_order_relaxed);
    }
    plan_n_.store(n, std::memory_order_relaxed);
    plan_seq_.fetch_add(1, std::memory_order_release);
  }

 private:
  // A slot is kFree, then kFilling while its poster writes the job, kPosted until the helper takes it
  // (kRunning) or its poster joins first (kFree again); the helper leaves it kDone, and join frees it.
  static constexpr int kFree = 0, kFilling = 1, kPosted = 2, kRunning = 3, kDone = 4;
  static constexpr int64_t kSlots = 4;
  static constexpr int kPollUs = 2000;
  static constexpr int64_t kPlanRanges = 256;
  static constexpr int64_t kLinesPerStep = 8;   // prefetched per idle poll, between checks for a job

  // Where the helper is in the plan (its own thread only).
  struct PlanCursor {
    uint64_t seq = 0;
    int64_t i = 0, offset = 0;
  };

  // Prefetch the next few cache lines of the plan; false when it has none left. Prefetches only: they
  // never fault, so a plan whose memory has since been freed (an adapter evicted) costs nothing but the
  // requests, and a plan rewritten meanwhile is at worst read half old, half new.
  bool read_ahead_step(PlanCursor& c) {
    const uint64_t seq = plan_seq_.load(std::memory_order_acquire);
    if (seq & 1) return false;                                     // being written
    if (seq != c.seq) c = PlanCursor{seq, 0, 0};
    for (int64_t lines = 0; lines < kLinesPerStep;) {
      if (c.i >= plan_n_.load(std::memory_order_relaxed)) return lines > 0;
      const char* p = plan_p_[c.i].load(std::memory_order_relaxed);
      const int64_t bytes = plan_bytes_[c.i].load(std::memory_order_relaxed);
      for (; c.offset < bytes && lines < kLinesPerStep; c.offset += 64, ++lines) __builtin_prefetch(p + c.offset);
      if (c.offset >= bytes) {
        ++c.i;
        c.offset = 0;
      }
    }
    return true;
  }

  struct Slot {
    std::atomic<int> state{kFree};
    std::atomic<uint64_t> order{0};          // posting order: the helper takes the oldest job first
    std::atomic<int64_t> next{0};            // the next chunk to hand out
    ChunkFn fn = nullptr;
    void* ctx = nullptr;
    int64_t n = 0;
  };

  HelperThread() : thread_([this] { loop(); }) { thread_.detach(); }

  static void take_chunks(Slot& slot) {
    for (int64_t i = slot.next.fetch_add(1, std::memory_order_relaxed); i < slot.n;
         i = slot.next.fetch_add(1, std::memory_order_relaxed))
      slot.fn(slot.ctx, i);
  }

  Slot* oldest_posted() {
    Slot* oldest = nullptr;
    for (Slot& slot : slots_) {
      if (slot.state.load(std::memory_order_acquire) != kPosted) continue;
      const uint64_t order = slot.order.load(std::memory_order_relaxed);
      if (oldest == nullptr || order < oldest->order.load(std::memory_order_relaxed)) oldest = &slot;
    }
    return oldest;
  }

  void loop() {
    PlanCursor cursor;
    for (;;) {
      // Poll first, yielding the core to any other runnable thread (the HTTP thread on a small box): jobs
      // come tens to hundreds of microseconds apart within a step, and waking a sleeping thread costs the
      // caller ~10-20 us on a VM. Between steps it goes to sleep.
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kPollUs);
      Slot* slot = oldest_posted();
      while (slot == nullptr && std::chrono::steady_clock::now() < until) {
        if (!read_ahead_step(cursor)) sched_yield();   // idle: bring the next job's memory in first
        slot = oldest_posted();
      }
      if (slot == nullptr) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return (slot = oldest_posted()) != nullptr; });
      }
      int posted = kPosted;      // its poster may have joined it meanwhile (and even posted another there)
      if (!slot->state.compare_exchange_strong(posted, kRunning, std::memory_order_acq_rel)) continue;
      take_chunks(*slot);
      slot->state.store(kDone, std::memory_order_release);
    }
  }

  Slot slots_[kSlots];
  std::atomic<const char*> plan_p_[kPlanRanges] = {};
  std::atomic<int64_t> plan_bytes_[kPlanRanges] = {};
  std::atomic<int64_t> plan_n_{0};
  std::atomic<uint64_t> plan_seq_{0};
  std::atomic<uint64_t> posted_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  std::thread thread_;
};

// The helper as plain function pointers, so that another extension can use this one's (a PyCapsule
// carries the table; extension modules are never unloaded).
struct HelperApi {
  int64_t (*post)(int64_t n, ChunkFn fn, void* ctx);
  void (*join)(int64_t ticket);
  void (*plan_read_ahead)(const ReadRange* ranges, int64_t n);
};

constexpr const char* kCapsuleName = "loraserve.helper_thread";

const HelperApi* own_helper() {
  static const HelperApi api{
      [](int64_t n, ChunkFn fn, void* ctx) { return HelperThread::get().post(n, fn, ctx); },
      [](int64_t ticket) { HelperThread::get().join(ticket); },
      [](const ReadRange* ranges, int64_t n) { HelperThread::get().plan_read_ahead(ranges, n); }};
  return &api;
}

std::atomic<const HelperApi*> adopted_helper{nullptr};

// The helper this extension's kernels use: the one adopted with use_helper, else its own.
const HelperApi& helper() {
  const HelperApi* api = adopted_helper.load(std::memory_order_acquire);
  return api != nullptr ? *api : *own_helper();
}

// `helper_capsule()` and `use_helper(capsule)` on an extension module (see the top of this file).
void def_helper_sharing(pybind11::module_& m) {
  m.def("helper_capsule", [] { return pybind11::capsule(const_cast<HelperApi*>(own_helper()), kCapsuleName); },
        "this extension's helper thread, for another extension's use_helper");
  m.def("use_helper", [](const pybind11::capsule& capsule) {
    TORCH_CHECK(capsule.name() != nullptr && std::strcmp(capsule.name(), kCapsuleName) == 0,
                "use_helper: expected the capsule from helper_capsule()");
    adopted_helper.store(capsule.get_pointer<HelperApi>(), std::memory_order_release);
  }, "run this extension's shared loops on the helper thread of the extension whose helper_capsule() this is");
}

// body(begin, end) over [0, n) in contiguous runs, shared by the caller and the helper, each run 2/runs
// of what the runs before it left (at least 1): the first are long (each read front to back, so a
// kernel's own prefetch of what comes next in its run stays useful) and the last are short, so neither
// thread waits long for the other's last run (equal runs of n/runs: a SmolLM2 decode step's 150 joins
// waited 0.7 ms for the other thread, 1.5 ms with adapters; so, 0.25 and 0.36 ms). False (and nothing
// run) where the helper has no free slot.
template <typename F>
bool split_runs(int64_t n, int64_t runs, const F& body) {
  constexpr int64_t kMaxRuns = 256;
  struct Ctx {
    const F* body;
    int64_t ends[kMaxRuns];
  };
  Ctx ctx;
  ctx.body = &body;
  const int64_t share = std::max<int64_t>(1, runs / 2);
  int64_t count = 0;
  for (int64_t begin = 0; begin < n; ++count) {
    begin += count == kMaxRuns - 1 ? n - begin : std::max<int64_t>(1, (n - begin + share - 1) / share);
    ctx.ends[count] = begin;
  }
  const HelperApi& h = helper();
  const int64_t ticket = h.post(count, [](void* c, int64_t k) {
    const auto* x = static_cast<const Ctx*>(c);
    (*x->body)(k == 0 ? 0 : x->ends[k - 1], x->ends[k]);
  }, &ctx);
  if (ticket < 0) return false;
  h.join(ticket);
  return true;
}

// Whether this extension's loops use the helper: the engine turns it on when it serves with one engine
// thread on 2+ cores (engine/llm_engine.py, set_helper).
std::atomic<bool> helper_enabled{false};

// body(begin, end) over [0, n) in `runs` runs shared with the helper (split_runs), if this extension's loops
// use it (set_helper), torch runs one thread and n is at least `at_least`; false (nothing run) otherwise, or
// where the helper has no free slot. The one test of whether to share, for every loop below.
template <typename F>
bool try_helper_runs(int64_t n, int64_t runs, int64_t at_least, const F& body) {
  return helper_enabled.load(std::memory_order_relaxed) && at::get_num_threads() == 1 && n >= at_least &&
         split_runs(n, runs, body);
}

// body(begin, end) over [0, n): shared with the helper (try_helper_runs), otherwise over torch's threads.
template <typename F>
void parallel_runs(int64_t n, int64_t runs, const F& body) {
  if (!try_helper_runs(n, runs, runs, body)) at::parallel_for(0, n, 1, body);
}

// body(begin, end) over [0, n): shared with the helper where it can be, else all on this thread (work too
// short to be worth forking torch's threads).
template <typename F>
void helper_runs(int64_t n, int64_t runs, const F& body) {
  if (!try_helper_runs(n, runs, 2, body)) body(0, n);
}

// `set_helper(on)` on an extension module whose loops run through parallel_runs.
void def_set_helper(pybind11::module_& m, const char* doc) {
  m.def("set_helper", [](bool on) { helper_enabled.store(on, std::memory_order_relaxed); }, doc);
}

}  // namespace
}  // namespace loraserve
