// One of sgdgen's CPU kernels, called through XLA's FFI from the CPU executable only (never from
// the portable step.mlirbc). Built at install by setup.py against the FFI headers jaxlib ships;
// loaded and registered by sgdgen/runtime/cpu_kernels.py; inserted by the sgd-cpu-kernels pass.
//
// sgdgen_sum_squares_f32(g_1, ..., g_N: f32[...]) -> N x f64[]: for each operand, the sum over
// every element of float64(float32(g*g)); or -> 1 x f64[]: that sum over all N operands together
// (a flat bucket's gradient given as its members' gradients, the pieces of one concatenate),
// the float32 norm's share of SEMANTICS §6 (products round in float32, the sum is accumulated in
// float64). XLA CPU's float64 reduction runs at a third of the float32 one's speed; this one
// reads the gradient once at memory bandwidth on XLA's intra-op threads. The order of summation
// is fixed (blocks of BLOCK elements, 16 accumulators each, blocks combined in index order), so
// the result does not depend on how many threads ran it.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
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

// Any number of float32 operands, one float64 scalar result each (the norms of many small gradients
// in one call: a call costs more than a small sum), or one for all of them; a large one split over
// the pool.
ffi::Error SumSquaresF32(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  const char* usage = "sgdgen_sum_squares_f32 takes N float32 arrays and returns N float64 scalars, or one";
  if ((args.size() != rets.size() && rets.size() != 1) || args.size() == 0) return ffi::Error::InvalidArgument(usage);
  const bool together = rets.size() == 1;  // one sum over every operand, in operand order
  struct Block {
    const float* x;
    int64_t n;
  };
  std::vector<Block> blocks;
  std::vector<double*> results;
  std::vector<int64_t> first_block;  // operand i owns blocks [first_block[i], first_block[i + 1])
  for (size_t i = 0; i < args.size(); ++i) {
    auto g = args.get<ffi::AnyBuffer>(i);
    auto out = rets.get<ffi::AnyBuffer>(together ? 0 : i);
    if (!g.has_value() || !out.has_value() || g->element_type() != ffi::DataType::F32 ||
        (*out)->element_type() != ffi::DataType::F64 || (*out)->element_count() != 1) {
      return ffi::Error::InvalidArgument(usage);
    }
    const float* x = g->typed_data<float>();
    const int64_t n = static_cast<int64_t>(g->element_count());
    if (!together || i == 0) {
      first_block.push_back(static_cast<int64_t>(blocks.size()));
      results.push_back((*out)->typed_data<double>());
    }
    const int64_t count = std::max<int64_t>(1, (n + kBlock - 1) / kBlock);  // an empty operand: one empty block
    for (int64_t k = 0; k < count; ++k) blocks.push_back({x + k * kBlock, std::min(kBlock, n - k * kBlock)});
  }
  first_block.push_back(static_cast<int64_t>(blocks.size()));
  const int64_t count = static_cast<int64_t>(blocks.size());
  std::vector<double> partial(count, 0.0);
  int64_t elements = 0;
  for (const auto& b : blocks) elements += b.n;
  // one thread for little work: waking the pool costs more than summing a few hundred KiB
  const int64_t helpers = elements < 2 * kBlock ? 0 : count - 1;
  sgdgen::ParallelFor(pool, count, helpers, [&](int64_t b) { partial[b] = BlockSum(blocks[b].x, blocks[b].n); });
  for (size_t i = 0; i < results.size(); ++i) {
    double s = 0.0;
    for (int64_t b = first_block[i]; b < first_block[i + 1]; ++b) s += partial[b];  // block order
    *results[i] = s;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(sgdgen_sum_squares_f32, SumSquaresF32,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs().RemainingRets());
