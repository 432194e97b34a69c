// CPU kernel of amp_engine::unscale_and_check_: grads *= inv_scale in place,
// with the non-finite check fused into the same pass (one read, one write per
// element). Contract: amp_engine/ops/reference.py.
//
// An element counts as non-finite if it is before scaling or its unscaled value,
// rounded to the grad's dtype, is. Both are caught by one test on the stored
// value: inf/NaN inputs stay inf/NaN through the multiply (inf * 0 = NaN), and
// narrowing keeps them. Per tensor the count goes to counts[i] (integer atomics,
// so the result is exact whatever the thread split); found_inf is only set,
// never cleared, and only by the calling thread after the parallel region.
#include <torch/csrc/stable/library.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <atomic>
#include <cstdint>
#include <optional>

#include "checks.h"
#include "cpu/grad_chunks.h"
#include "cpu/grad_dtypes.h"

namespace amp_engine::cpu {
namespace {

using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// Each returns the number of non-finite elements among p[0, n), n <= kChunk
// (so an int32 lane count cannot overflow and the loops stay 32-bit wide).
AMP_ENGINE_ISA_CLONES int64_t unscale_chunk(float* __restrict p, int64_t n, float inv) {
  int32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float u = math::unscaled(p[i], inv);
    p[i] = u;
    bad += math::bad_f32(u);
  }
  return bad;
}

AMP_ENGINE_ISA_CLONES int64_t unscale_chunk(double* __restrict p, int64_t n, double inv) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double u = math::unscaled(p[i], inv);
    p[i] = u;
    bad += math::bad_f64(u);
  }
  return bad;
}

AMP_ENGINE_ISA_CLONES int64_t unscale_chunk(Half* p16, int64_t n, float inv) {
  return scale_half(reinterpret_cast<uint16_t*>(p16), n, inv);
}

AMP_ENGINE_ISA_CLONES int64_t unscale_chunk(BFloat16* p16, int64_t n, float inv) {
  uint16_t* __restrict p = reinterpret_cast<uint16_t*>(p16);
  int32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float u = math::unscaled(bf16_to_float(p[i]), inv);
    p[i] = float_to_bf16(u);
    bad += math::bad_bf16(u);
  }
  return bad;
}

// One dtype group: returns whether any element was non-finite.
template <class T, class Inv>
bool unscale_group(const GradSpans& g, Inv inv, int64_t* counts) {
  std::atomic<bool> any_bad{false};
  for_each_chunk(g, [&](const GradSpan& s, int64_t, int64_t off, int64_t len) {
    const int64_t bad = unscale_chunk(static_cast<T*>(s.data) + off, len, inv);
    if (bad != 0) {  // rare: atomics off the common path
      any_bad.store(true, std::memory_order_relaxed);
      if (counts != nullptr) {
        __atomic_fetch_add(counts + s.tensor, bad, __ATOMIC_RELAXED);
      }
    }
  });
  return any_bad.load(std::memory_order_relaxed);
}

void unscale_and_check_cpu(TensorList grads, Tensor inv_scale, Tensor found_inf,
                           OptTensor counts) {
  check_grad_check_args(grads, inv_scale, found_inf, counts);
  const bool has_counts = counts.has_value() && counts->defined();

  const float inv = *ptr<const float>(inv_scale);
  int64_t* counts_data = has_counts ? ptr<int64_t>(*counts) : nullptr;

  // Non-dense views (rare) are processed as contiguous copies, copied back below.
  DenseList dense;
  GradGroups& groups = scratch_groups();
  if (!collect_spans(grads, groups)) {
    dense = make_dense(grads);
    collect_spans(dense.tensors, groups);
  }
  const bool any_bad = unscale_group<float>(groups[kF32], inv, counts_data) |
                       unscale_group<Half>(groups[kF16], inv, counts_data) |
                       unscale_group<BFloat16>(groups[kBF16], inv, counts_data) |
                       // fp64 grads are scaled in fp64 by the exactly widened inv_scale
                       unscale_group<double>(groups[kF64], static_cast<double>(inv), counts_data);
  copy_back(grads, dense);
  if (any_bad) *ptr<float>(found_inf) = 1.0f;
}

}  // namespace
}  // namespace amp_engine::cpu

STABLE_TORCH_LIBRARY_IMPL(amp_engine, CPU, m) {
  m.impl("unscale_and_check_", TORCH_BOX(&amp_engine::cpu::unscale_and_check_cpu));
}
