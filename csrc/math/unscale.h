// Unscale + check of one grad element (amp_engine/ops/reference.py): the
// unscaled value u = float(g) * inv_scale (fp64 for fp64 grads) is stored
// rounded to the grad's dtype; the element counts as non-finite if g was or
// the stored value is. Both are one test on u: inf/NaN stay inf/NaN through the
// multiply (inf * 0 = NaN), and for fp16/bf16 the stored value is inf/NaN
// exactly when |u| reaches the narrow type's overflow threshold.
#pragma once
#include "math/hd.h"

namespace amp_engine::math {

// Smallest |fp32| that rounds to inf in the narrow type (max finite + half an
// ulp: the tie goes to the even neighbour, inf). As bits, so one unsigned
// compare of |u| also catches inf and NaN.
constexpr uint32_t kHalfOverflowBits = 0x477FF000u;  // 65520.0f
constexpr uint32_t kBf16OverflowBits = 0x7F7F8000u;  // bf16 max + half ulp

AMP_ENGINE_HD inline float unscaled(float g, float inv_scale) { return g * inv_scale; }
// fp64 grads are scaled in fp64 by the exactly widened inv_scale
AMP_ENGINE_HD inline double unscaled(double g, double inv_scale) { return g * inv_scale; }

// 1 if u, stored in the grad's dtype, is inf/NaN.
AMP_ENGINE_HD inline int32_t bad_f32(float u) { return nonfinite(u); }
AMP_ENGINE_HD inline int32_t bad_f64(double u) { return static_cast<int32_t>(nonfinite(u)); }
AMP_ENGINE_HD inline int32_t bad_f16(float u) {
  return (bits_of(u) & 0x7FFFFFFFu) >= kHalfOverflowBits;
}
AMP_ENGINE_HD inline int32_t bad_bf16(float u) {
  return (bits_of(u) & 0x7FFFFFFFu) >= kBf16OverflowBits;
}

}  // namespace amp_engine::math
