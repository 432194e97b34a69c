// CPU kernel of amp_engine::update_scale_: torch._amp_update_scale_ plus
// hysteresis and [min_scale, max_scale] bounds, on scalars in place (no host
// round trip beyond reading the CPU tensors). The rule is math::update_scale
// (csrc/math/scale_update.h), shared with CUDA; contract and the meaning of
// hysteresis: amp_engine/ops/reference.py (update_scale_).
#include <torch/csrc/stable/library.h>

#include <cstdint>

#include "checks.h"
#include "math/scale_update.h"

namespace amp_engine::cpu {
namespace {

void update_scale_cpu(Tensor scale, Tensor growth_tracker, Tensor hysteresis_tracker,
                      Tensor found_inf, double growth_factor, double backoff_factor,
                      int64_t growth_interval, int64_t hysteresis, double min_scale,
                      double max_scale) {
  check_update_scale_args(scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor,
                          backoff_factor, growth_interval, hysteresis, min_scale, max_scale);
  float* scale_p = ptr<float>(scale);
  int32_t* growth_p = ptr<int32_t>(growth_tracker);
  int32_t* hyst_p = ptr<int32_t>(hysteresis_tracker);
  const math::ScaleState next = math::update_scale(
      {*scale_p, *growth_p, *hyst_p}, *ptr<const float>(found_inf), growth_factor,
      backoff_factor, growth_interval, static_cast<int32_t>(hysteresis),
      static_cast<float>(min_scale), static_cast<float>(max_scale));
  *scale_p = next.scale;
  *growth_p = next.growth_tracker;
  *hyst_p = next.hysteresis_tracker;
}

}  // namespace
}  // namespace amp_engine::cpu

STABLE_TORCH_LIBRARY_IMPL(amp_engine, CPU, m) {
  m.impl("update_scale_", TORCH_BOX(&amp_engine::cpu::update_scale_cpu));
}
