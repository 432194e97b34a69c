// The loss-scale rule (amp_engine/ops/reference/scaling.py update_scale_) and the
// bookkeeping update_scale_ does in the same launch (after_update_ there):
// torch._amp_update_scale_ plus hysteresis and [min_scale, max_scale] bounds.
// Products in fp64 rounded to fp32 (as torch's kernel), a NaN scale passes the
// bounds (as clamp does), the int32 trackers wrap as int32 tensor arithmetic.
#pragma once
#include "math/hd.h"

namespace amp_engine::math {

struct ScaleState {
  float scale;
  int32_t growth_tracker;
  int32_t hysteresis_tracker;
};

AMP_ENGINE_HD inline int32_t wrapping_add(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
}

// found_inf: the flag's value (any non-zero, NaN too, means overflow).
AMP_ENGINE_HD inline ScaleState update_scale(ScaleState st, float found_inf, double growth_factor,
                                             double backoff_factor, int64_t growth_interval,
                                             int32_t hysteresis, float min_scale,
                                             float max_scale) {
  const float s = st.scale;
  const bool inf = found_inf != 0.0f;
  // Overflow: the hysteresis tracker drops by one; back off once it is spent,
  // not below min_scale.
  const int32_t ht_minus_1 = wrapping_add(st.hysteresis_tracker, -1);
  const bool backoff = inf && ht_minus_1 <= 0;
  float backed = static_cast<float>(static_cast<double>(s) * backoff_factor);
  backed = backed < min_scale ? min_scale : backed;  // NaN stays NaN
  // Clean step: growth after growth_interval consecutive ones, never to inf.
  // Compared in int64: an interval beyond int32 is simply never reached.
  const int32_t successful = wrapping_add(st.growth_tracker, 1);
  const bool grow = !inf && static_cast<int64_t>(successful) >= growth_interval;
  float grown = static_cast<float>(static_cast<double>(s) * growth_factor);
  grown = nonfinite(grown) ? s : (max_scale < grown ? max_scale : grown);

  ScaleState out;
  out.scale = backoff ? backed : (grow ? grown : s);
  out.growth_tracker = (inf || grow) ? 0 : successful;
  out.hysteresis_tracker = inf ? (ht_minus_1 > 0 ? ht_minus_1 : 0) : hysteresis;
  return out;
}

// ---- update_scale_'s bookkeeping after the new scale (reference.after_update_) ----

// torch's unscale_ multiplier: fp32(1 / fp64(scale)).
AMP_ENGINE_HD inline float inv_scale_of(float scale) {
  return static_cast<float>(1.0 / static_cast<double>(scale));
}

// counters: updates so far, updates that found an overflow, the last update
// that ended with the scale above the floor (the ring's write position is
// overflow_updates % rows, taken before this update counts).
struct UpdateCounters {
  int64_t updates;
  int64_t overflow_updates;
  int64_t last_above_floor;
};

AMP_ENGINE_HD inline UpdateCounters count_update(UpdateCounters c, float found_inf,
                                                 float new_scale, float min_scale) {
  UpdateCounters out = c;
  out.overflow_updates += found_inf != 0.0f ? 1 : 0;  // NaN counts, as in the scale rule
  if (new_scale > min_scale) out.last_above_floor = c.updates;
  out.updates = c.updates + 1;
  return out;
}

}  // namespace amp_engine::math
