// The clip coefficient where the norm is taken (grad_norm_and_check's max_norm;
// reference: amp_engine/ops/reference/scaling.py clip_outputs_). torch's
// clip_grads_with_norm_ op for op in fp32: clamp(max_norm / (total + 1e-6), max=1),
// where `max_norm / t` is Tensor.__rtruediv__, i.e. t.reciprocal() * max_norm.
// A NaN norm gives NaN (clamp propagates it), an inf norm 0.
#pragma once
#include "math/hd.h"

namespace amp_engine::math {

AMP_ENGINE_HD inline float clip_coef(float total, double max_norm) {
  const float t = total + static_cast<float>(1e-6);
  const float c = (1.0f / t) * static_cast<float>(max_norm);
  return c > 1.0f ? 1.0f : c;
}

// What a fused step multiplies the still-scaled grads by: inv_scale * clip_coef.
AMP_ENGINE_HD inline float step_scale(float inv_scale, float coef) { return inv_scale * coef; }

}  // namespace amp_engine::math
