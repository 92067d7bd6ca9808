// One of sgdgen's CPU kernels, called through XLA's FFI from the CPU executable only (never from
// the portable step.mlirbc); inserted by the sgd-cpu-update pass (passes/cpu_update.py), which
// calls it only where the step's IR computes exactly this formula for a float32 variable.
//
// sgdgen_sgd_update_f32: one variable's update (SEMANTICS §4.5-4.10) in ONE pass over memory.
// XLA CPU (jaxlib 0.10) forms no multi-output loop fusion, so the new momentum, weight and average
// are three loop fusions, each re-reading what the one before wrote (40 bytes a parameter); here
// each element is read once and written once (28 bytes with EMA), in place where the pass declared
// operand aliases. Every operation rounds to float32 in the IR's order (-ffp-contract=off: no
// fused multiply-add), so the results are the IR's, bit for bit:
//
//   g'  = g                          clip 0 (none)
//         g * s                      clip 1 (global_clipnorm: s the step's scale)
//         (g * c) / s                clip 2 (clipnorm: s = max(norm, c))
//         max(min(g, c), c_neg)      clip 3 (clipvalue)
//   w1  = decay ? w - (w * wd) * lr : w
//   st  = (-g') * lr
//   m'  = st + m * mom
//   w2  = nesterov ? w1 + (st + m' * mom) : w1 + m'
//   a'  = keep * a + take * w2       (ema)
//   w'  = due ? a' : w2              (overwrite)
//   on a skipped step (skip_nonfinite) every result keeps its operand's value.
//
// Operands: g, w, m, [a if ema], lr, [s if clip 1 or 2], [due if overwrite], [skip if skip];
// results: w', m', [a' if ema]. Attributes: flags = [clip, decay, nesterov, ema, overwrite, skip]
// or [..., segments], constants = float32 bit patterns of [wd, mom, keep, take, c, c_neg] (unused
// ones 0). With `segments` = K > 1, g arrives as K operands g_1..g_K (in place of g) whose element
// counts add up to w's: a flat bucket's gradient as its members' gradients, read where they lie
// (g = concatenate(g_1, ..., g_K) in the IR, which is then never materialised).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTask = int64_t{1} << 16;  // elements per task on the pool (256 KiB of each array)

// The update runs in place on w, m and a (the results' buffers, holding the operands' values).
struct Args {
  const float* g;
  float *w, *m, *a;
  float lr, s, wd, mom, keep, take, c, c_neg;
};

// stablehlo.minimum / maximum: NaN if either operand is NaN; -0 below +0
inline float Min(float x, float y) {
  if (x != x || y != y) return x + y;
  if (x == y) return std::signbit(x) ? x : y;
  return x < y ? x : y;
}
inline float Max(float x, float y) {
  if (x != x || y != y) return x + y;
  if (x == y) return std::signbit(x) ? y : x;
  return x > y ? x : y;
}

template <int Clip, bool Decay, bool Nesterov, bool Ema, bool Due>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void Update(const Args& p, int64_t begin, int64_t end) {
  const float* __restrict__ g_in = p.g;
  float* __restrict__ w_io = p.w;
  float* __restrict__ m_io = p.m;
  float* __restrict__ a_io = p.a;
  for (int64_t i = begin; i < end; ++i) {
    float g = g_in[i];
    if constexpr (Clip == 1) g = g * p.s;
    if constexpr (Clip == 2) g = (g * p.c) / p.s;
    if constexpr (Clip == 3) g = Max(Min(g, p.c), p.c_neg);
    float w = w_io[i];
    if constexpr (Decay) w = w - (w * p.wd) * p.lr;
    const float step = (-g) * p.lr;
    const float m = step + m_io[i] * p.mom;
    if constexpr (Nesterov) {
      w = w + (step + m * p.mom);
    } else {
      w = w + m;
    }
    m_io[i] = m;
    if constexpr (Ema) {
      const float a = p.keep * a_io[i] + p.take * w;
      a_io[i] = a;
      w_io[i] = Due ? a : w;
    } else {
      w_io[i] = w;
    }
  }
}

using Kernel = void (*)(const Args&, int64_t, int64_t);

template <int Clip, bool Decay, bool Nesterov>
Kernel Pick3(bool ema, bool due) {
  if (!ema) return Update<Clip, Decay, Nesterov, false, false>;
  return due ? Update<Clip, Decay, Nesterov, true, true> : Update<Clip, Decay, Nesterov, true, false>;
}

template <int Clip>
Kernel Pick1(bool decay, bool nesterov, bool ema, bool due) {
  if (decay) return nesterov ? Pick3<Clip, true, true>(ema, due) : Pick3<Clip, true, false>(ema, due);
  return nesterov ? Pick3<Clip, false, true>(ema, due) : Pick3<Clip, false, false>(ema, due);
}

Kernel Pick(int64_t clip, bool decay, bool nesterov, bool ema, bool due) {
  switch (clip) {
    case 0: return Pick1<0>(decay, nesterov, ema, due);
    case 1: return Pick1<1>(decay, nesterov, ema, due);
    case 2: return Pick1<2>(decay, nesterov, ema, due);
    default: return Pick1<3>(decay, nesterov, ema, due);
  }
}

ffi::Error Bad(const std::string& what) { return ffi::Error::InvalidArgument("sgdgen_sgd_update_f32: " + what); }

float FromBits(int64_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits);
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

ffi::Error SgdUpdateF32(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                        ffi::Span<const int64_t> flags, ffi::Span<const int64_t> constants) {
  if ((flags.size() != 6 && flags.size() != 7) || constants.size() != 6 || flags[0] < 0 || flags[0] > 3 ||
      (flags.size() == 7 && flags[6] < 1)) {
    return Bad("flags must be [clip 0-3, decay, nesterov, ema, overwrite, skip] or [..., segments >= 1] and constants "
               "6 float32 bit patterns");
  }
  const int64_t clip = flags[0];
  const bool decay = flags[1], nesterov = flags[2], ema = flags[3], overwrite = flags[4], skip = flags[5];
  const size_t segments = flags.size() == 7 ? static_cast<size_t>(flags[6]) : 1;
  const size_t arrays = ema ? 4 : 3;
  const size_t want = segments + arrays - 1 + 1 + (clip == 1 || clip == 2) + overwrite + skip;
  if (args.size() != want || rets.size() != arrays - 1) {
    return Bad("takes " + std::to_string(want) + " operands and " + std::to_string(arrays - 1) + " results for its flags, got " +
               std::to_string(args.size()) + " and " + std::to_string(rets.size()));
  }
  // the gradient's segments: segment k holds elements [start[k], start[k + 1]) of g
  std::vector<const float*> g(segments);
  std::vector<int64_t> start(segments + 1, 0);
  for (size_t k = 0; k < segments; ++k) {
    auto b = args.get<ffi::AnyBuffer>(k);
    if (!b.has_value() || b->element_type() != ffi::DataType::F32) return Bad("g, w, m and a must be float32 arrays");
    g[k] = b->typed_data<float>();
    start[k + 1] = start[k] + static_cast<int64_t>(b->element_count());
  }
  const float* in[4] = {g[0], nullptr, nullptr, nullptr};
  const int64_t n = start[segments];
  for (size_t i = 1; i < arrays; ++i) {
    auto b = args.get<ffi::AnyBuffer>(segments + i - 1);
    if (!b.has_value() || b->element_type() != ffi::DataType::F32) return Bad("g, w, m and a must be float32 arrays");
    if (static_cast<int64_t>(b->element_count()) != n) return Bad("g, w, m and a differ in element count");
    in[i] = b->typed_data<float>();
  }
  float* out[3] = {nullptr, nullptr, nullptr};
  for (size_t k = 0; k < rets.size(); ++k) {
    auto r = rets.get<ffi::AnyBuffer>(k);
    if (!r.has_value() || (*r)->element_type() != ffi::DataType::F32 || static_cast<int64_t>((*r)->element_count()) != n) {
      return Bad("results must be float32 arrays of the operands' element count");
    }
    out[k] = (*r)->typed_data<float>();
  }
  size_t next = segments + arrays - 1;
  auto scalar = [&](ffi::DataType type, const char* what, auto* value) -> ffi::Error {
    auto b = args.get<ffi::AnyBuffer>(next++);
    if (!b.has_value() || b->element_type() != type || b->element_count() != 1) return Bad(std::string(what) + " must be a scalar");
    std::memcpy(value, b->untyped_data(), sizeof *value);
    return ffi::Error::Success();
  };
  Args p{in[0], out[0], out[1], out[2], 0, 0, 0, 0, 0, 0, 0, 0};
  bool due = false, skipped = false;
  if (auto e = scalar(ffi::DataType::F32, "lr", &p.lr); e.failure()) return e;
  if (clip == 1 || clip == 2) {
    if (auto e = scalar(ffi::DataType::F32, "the clip scale", &p.s); e.failure()) return e;
  }
  if (overwrite) {
    if (auto e = scalar(ffi::DataType::PRED, "due", &due); e.failure()) return e;
  }
  if (skip) {
    if (auto e = scalar(ffi::DataType::PRED, "skip", &skipped); e.failure()) return e;
  }
  p.wd = FromBits(constants[0]), p.mom = FromBits(constants[1]), p.keep = FromBits(constants[2]);
  p.take = FromBits(constants[3]), p.c = FromBits(constants[4]), p.c_neg = FromBits(constants[5]);

  const int64_t tasks = std::max<int64_t>(1, (n + kTask - 1) / kTask);
  const int64_t helpers = n < 2 * kTask ? 0 : tasks - 1;  // waking the pool costs more than a few hundred KiB
  // results not in place (an operand the pass could not alias) start as a copy of their operand
  const float* state[3] = {in[1], in[2], in[3]};
  bool copies = false;
  for (size_t k = 0; k < rets.size(); ++k) copies = copies || out[k] != state[k];
  if (copies) sgdgen::ParallelFor(pool, tasks, helpers, [&](int64_t t) {
    const int64_t begin = t * kTask, len = std::min(n, begin + kTask) - begin;
    for (size_t k = 0; k < rets.size(); ++k) {
      if (out[k] != state[k]) std::memcpy(out[k] + begin, state[k] + begin, len * sizeof(float));
    }
  });
  if (skipped) return ffi::Error::Success();  // a skipped step: every result keeps its operand's value
  const Kernel kernel = Pick(clip, decay, nesterov, ema, due);
  if (segments == 1) {
    sgdgen::ParallelFor(pool, tasks, helpers, [&](int64_t t) { kernel(p, t * kTask, std::min(n, (t + 1) * kTask)); });
    return ffi::Error::Success();
  }
  // a task's range [begin, end) of the bucket, run segment by segment: each piece with its own g and
  // w, m, a advanced to the piece's first element (the same operations on the same elements)
  sgdgen::ParallelFor(pool, tasks, helpers, [&](int64_t t) {
    const int64_t begin = t * kTask, end = std::min(n, (t + 1) * kTask);
    size_t k = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (int64_t lo = begin; lo < end; ++k) {
      const int64_t hi = std::min(end, start[k + 1]);
      if (hi > lo) {
        Args piece = p;
        piece.g = g[k] + (lo - start[k]);
        piece.w = p.w + lo, piece.m = p.m + lo, piece.a = p.a != nullptr ? p.a + lo : nullptr;
        kernel(piece, 0, hi - lo);
      }
      lo = hi;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(sgdgen_sgd_update_f32, SgdUpdateF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("flags")
                                  .Attr<ffi::Span<const int64_t>>("constants"));
