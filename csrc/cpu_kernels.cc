// sgdgen's CPU kernels, called through XLA's FFI from the CPU executable only (never from the
// portable step.mlirbc). Built at install by setup.py against the FFI headers jaxlib ships;
// loaded and registered by sgdgen/runtime/cpu_kernels.py; inserted by the sgd-cpu-kernels pass.
//
// sgdgen_sum_squares_f32(g: f32[...]) -> f64[]: sum over every element of float64(float32(g*g)),
// the float32 norm's share of SEMANTICS §6 (products round in float32, the sum is accumulated in
// float64). XLA CPU's float64 reduction runs at a third of the float32 one's speed; this one
// reads the gradient once at memory bandwidth on XLA's intra-op threads. The order of summation
// is fixed (blocks of BLOCK elements, 16 accumulators each, blocks combined in index order), so
// the result does not depend on how many threads ran it.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = int64_t{1} << 18;  // 1 MiB of float32 per task
constexpr int kLanes = 16;                     // independent accumulators: 4 AVX2 registers of doubles

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
double BlockSum(const float* x, int64_t n) {
  double acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float p = x[i + j] * x[i + j];  // rounded to float32, as the program's multiply
      acc[j] += static_cast<double>(p);
    }
  }
  double tail = 0.0;
  for (; i < n; ++i) {
    const float p = x[i] * x[i];
    tail += static_cast<double>(p);
  }
  double s = tail;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// Blocks are claimed from a shared counter by the calling thread and by tasks on XLA's pool.
// The caller only ever waits for blocks another thread has claimed (and is running), never for a
// task still queued, so a busy pool cannot deadlock it. Tasks keep the state alive.
struct Job {
  const float* x;
  int64_t n;
  int64_t blocks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::vector<double> partial;

  void Work() {
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < blocks;) {
      const int64_t begin = b * kBlock;
      partial[b] = BlockSum(x + begin, std::min(kBlock, n - begin));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error SumSquaresF32(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> out) {
  if (g.element_type() != ffi::DataType::F32 || out->element_type() != ffi::DataType::F64 ||
      out->element_count() != 1) {
    return ffi::Error::InvalidArgument("sgdgen_sum_squares_f32 takes a float32 array and returns a float64 scalar");
  }
  const float* x = g.typed_data<float>();
  const int64_t n = static_cast<int64_t>(g.element_count());
  double* result = out->typed_data<double>();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  if (blocks <= 1) {
    *result = BlockSum(x, n);
    return ffi::Error::Success();
  }
  auto job = std::make_shared<Job>();
  job->x = x;
  job->n = n;
  job->blocks = blocks;
  job->partial.assign(blocks, 0.0);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), blocks) - 1;
  for (int64_t k = 0; k < helpers; ++k) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < blocks) std::this_thread::yield();
  double s = 0.0;
  for (double p : job->partial) s += p;  // index order: the same sum on any number of threads
  *result = s;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(sgdgen_sum_squares_f32, SumSquaresF32,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
