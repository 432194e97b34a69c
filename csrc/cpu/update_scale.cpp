// CPU kernel of amp_engine::update_scale_: torch._amp_update_scale_ plus
// hysteresis and [min_scale, max_scale] bounds, on scalars in place (no host
// round trip beyond reading the CPU tensors), and the step's bookkeeping in
// the same call (the next inv_scale, the next flag zeroed, the update counters
// and the overflow ring). The rules are csrc/math/scale_update.h, shared with
// CUDA; contract: amp_engine/ops/reference/scaling.py (update_scale_, after_update_).
#include <torch/csrc/stable/library.h>

#include <cstdint>
#include <cstring>

#include "checks.h"
#include "math/scale_update.h"

namespace amp_engine::cpu {
namespace {

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

void update_scale_cpu(Tensor scale, Tensor growth_tracker, Tensor hysteresis_tracker,
                      Tensor found_inf, double growth_factor, double backoff_factor,
                      int64_t growth_interval, int64_t hysteresis, double min_scale,
                      double max_scale, OptTensor inv_scale, OptTensor next_found_inf,
                      OptTensor counters, OptTensor counts, OptTensor ring) {
  check_update_scale_args(scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor,
                          backoff_factor, growth_interval, hysteresis, min_scale, max_scale);
  check_update_bookkeeping_args(inv_scale, next_found_inf, counters, counts, ring, scale.device());
  float* scale_p = ptr<float>(scale);
  int32_t* growth_p = ptr<int32_t>(growth_tracker);
  int32_t* hyst_p = ptr<int32_t>(hysteresis_tracker);
  const float flag = *ptr<const float>(found_inf);  // read before next_found_inf is zeroed
  const float lo = static_cast<float>(min_scale);
  const math::ScaleState next = math::update_scale(
      {*scale_p, *growth_p, *hyst_p}, flag, growth_factor, backoff_factor, growth_interval,
      static_cast<int32_t>(hysteresis), lo, static_cast<float>(max_scale));
  *scale_p = next.scale;
  *growth_p = next.growth_tracker;
  *hyst_p = next.hysteresis_tracker;

  if (given(inv_scale)) *ptr<float>(*inv_scale) = math::inv_scale_of(next.scale);
  if (given(next_found_inf)) *ptr<float>(*next_found_inf) = 0.0f;
  if (!given(counters)) return;
  int64_t* c = ptr<int64_t>(*counters);
  if (given(ring)) {
    const int64_t n = counts->size(0);
    int64_t* row = ptr<int64_t>(*ring) + (c[1] % ring->size(0)) * (n + 1);
    row[0] = c[0];
    if (n > 0) std::memcpy(row + 1, ptr<const int64_t>(*counts), sizeof(int64_t) * n);
  }
  const math::UpdateCounters out = math::count_update({c[0], c[1], c[2]}, flag, next.scale, lo);
  c[0] = out.updates;
  c[1] = out.overflow_updates;
  c[2] = out.last_above_floor;
}

}  // namespace
}  // namespace amp_engine::cpu

STABLE_TORCH_LIBRARY_IMPL(amp_engine, CPU, m) {
  m.impl("update_scale_", TORCH_BOX(&amp_engine::cpu::update_scale_cpu));
}
