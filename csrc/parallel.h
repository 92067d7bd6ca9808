// sgdgen's CPU kernels' one way of running work on XLA's intra-op thread pool.
#ifndef SGDGEN_CSRC_PARALLEL_H_
#define SGDGEN_CSRC_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace sgdgen {

// Runs task(k) for every k in [0, count), on the calling thread and on up to `helpers` threads of
// XLA's pool. Tasks are claimed from a shared counter: the caller only ever waits for tasks another
// thread has claimed (and is running), never for one still queued, so a busy pool cannot deadlock
// it. A helper that starts after the caller returned claims nothing and touches only the shared
// counters, which it keeps alive.
template <class Task>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, int64_t helpers, const Task& task) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, count, &task] {
    for (int64_t k; (k = counters->next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      task(k);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  helpers = std::min<int64_t>({helpers, static_cast<int64_t>(pool.num_threads()), count - 1});
  // a late helper never reads `task` (the caller's): it sees next >= count first and returns
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work(); });
  work();
  while (counters->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace sgdgen

#endif  // SGDGEN_CSRC_PARALLEL_H_
