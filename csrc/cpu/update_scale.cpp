// CPU kernel of amp_engine::update_scale_: torch._amp_update_scale_ plus
// hysteresis and [min_scale, max_scale] bounds, on scalars in place (no host
// round trip beyond reading the CPU tensors). Contract and the meaning of
// hysteresis: amp_engine/ops/reference.py (update_scale_).
//
// Arithmetic mirrors the reference tensor ops exactly: products in fp64
// rounded to fp32 (as torch's kernel does), NaN passes clamp_min/clamp_max,
// the int32 trackers wrap as int32 tensor arithmetic does.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "checks.h"

namespace amp_engine::cpu {
namespace {

int32_t wrapping_add(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
}

void update_scale_cpu(const at::Tensor& scale, const at::Tensor& growth_tracker,
                      const at::Tensor& hysteresis_tracker, const at::Tensor& found_inf,
                      double growth_factor, double backoff_factor, int64_t growth_interval,
                      int64_t hysteresis, double min_scale, double max_scale) {
  check_update_scale_args(scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor,
                          backoff_factor, growth_interval, hysteresis, min_scale, max_scale);
  // The refill value is stored in the int32 tracker.
  TORCH_CHECK_VALUE(hysteresis <= std::numeric_limits<int32_t>::max(),
                    "hysteresis must be <= 2147483647 (the tracker is int32), got ", hysteresis);

  float* scale_p = scale.mutable_data_ptr<float>();
  int32_t* growth_p = growth_tracker.mutable_data_ptr<int32_t>();
  int32_t* hyst_p = hysteresis_tracker.mutable_data_ptr<int32_t>();
  const float s = *scale_p;
  const int32_t gt = *growth_p;
  const int32_t ht = *hyst_p;
  const bool inf = *found_inf.const_data_ptr<float>() != 0.0f;  // NaN counts as overflow

  // Overflow: the hysteresis tracker drops by one; back off once it is spent.
  const int32_t ht_minus_1 = wrapping_add(ht, -1);
  const bool backoff = inf && ht_minus_1 <= 0;
  float backed = static_cast<float>(static_cast<double>(s) * backoff_factor);
  const float lo = static_cast<float>(min_scale);
  if (!std::isnan(backed)) backed = std::max(backed, lo);

  // Clean step: growth after growth_interval consecutive ones, never to inf.
  // Compared in int64: an interval beyond int32 is simply never reached.
  const int32_t successful = wrapping_add(gt, 1);
  const bool grow = !inf && static_cast<int64_t>(successful) >= growth_interval;
  float grown = static_cast<float>(static_cast<double>(s) * growth_factor);
  grown = std::isfinite(grown) ? std::min(grown, static_cast<float>(max_scale)) : s;

  *scale_p = backoff ? backed : (grow ? grown : s);
  *growth_p = (inf || grow) ? 0 : successful;
  *hyst_p = inf ? std::max<int32_t>(ht_minus_1, 0) : static_cast<int32_t>(hysteresis);
}

}  // namespace
}  // namespace amp_engine::cpu

TORCH_LIBRARY_IMPL(amp_engine, CPU, m) {
  m.impl("update_scale_", &amp_engine::cpu::update_scale_cpu);
}
