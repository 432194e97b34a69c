// The Adam / AdamW update of one element, and the per-call and per-tensor
// scalars it uses: amp_engine/ops/reference/optim.py's arithmetic, operation for
// operation (each a single correctly rounded fp op, no fused multiply-adds; see
// hd.h). A is the compute type: fp32, fp64 for fp64 params.
#pragma once
#include "math/hd.h"

namespace amp_engine::math {

enum class Decay { kNone, kDecoupled, kL2 };

template <typename A>
struct AdamCoeffs {  // the same for every tensor of the call
  A grad_mul;          // inv_scale, negated for maximize (an exact sign flip)
  A wd;                // L2 weight decay (Adam)
  A decay;             // 1 - lr * wd, rounded once (AdamW)
  A w1, one_minus_w1;  // torch's lerp weight 1 - beta1, and 1 - w1
  A beta2, omb2, eps;  // beta2, 1 - beta2, eps
  bool lerp_small;     // w1 < 0.5: torch's lerp takes its first formula
};

// Hyper-parameters arrive as fp64 (the op's floats) and are rounded to A once,
// as the reference's fp32 tensors hold them.
template <typename A>
AMP_ENGINE_HD inline AdamCoeffs<A> adam_coeffs(A inv_scale, double lr, double beta1, double beta2,
                                               double eps, double wd, bool maximize) {
  AdamCoeffs<A> s;
  s.grad_mul = maximize ? -inv_scale : inv_scale;
  s.wd = static_cast<A>(wd);
  s.decay = static_cast<A>(1.0 - lr * wd);
  s.w1 = static_cast<A>(1.0 - beta1);
  s.one_minus_w1 = A(1) - s.w1;
  s.lerp_small = s.w1 < A(0.5);
  s.beta2 = static_cast<A>(beta2);
  s.omb2 = static_cast<A>(1.0 - beta2);
  s.eps = static_cast<A>(eps);
  return s;
}

// A tensor's step-dependent scalars, in fp64 from the incremented step (as
// torch's single-tensor path), then rounded to A.
template <typename A>
struct AdamStepTerms {
  A bc2_sqrt;       // sqrt(1 - beta2**step)
  A neg_step_size;  // -lr / (1 - beta1**step)
};

template <typename A>
AMP_ENGINE_HD inline AdamStepTerms<A> adam_step_terms(double lr, double beta1, double beta2,
                                                      float step_before) {
  const double step = static_cast<double>(step_before) + 1.0;
  const double bc1 = 1.0 - pow_f64(beta1, step);
  return {static_cast<A>(sqrt_rn(1.0 - pow_f64(beta2, step))), static_cast<A>(-(lr / bc1))};
}

// One element: g the grad as read (in A), w the weight; updates m, v (and
// vmax with amsgrad) and returns the new weight. Callers pass d / amsgrad as
// constants where they can, so a loop around it has no branches and vectorizes.
template <typename A>
AMP_ENGINE_HD inline A adam_update(const AdamCoeffs<A>& s, Decay d, bool amsgrad,
                                   const AdamStepTerms<A>& t, A g, A w, A& m, A& v, A& vmax) {
  A gk = g * s.grad_mul;
  if (d == Decay::kDecoupled) w = w * s.decay;
  if (d == Decay::kL2) gk = gk + s.wd * w;
  // torch's lerp: both forms are computed and one is selected (a blend, no branch)
  const A mo = m;
  const A diff = gk - mo;
  const A m_small = mo + s.w1 * diff;
  const A m_large = gk - diff * s.one_minus_w1;
  const A mk = s.lerp_small ? m_small : m_large;
  const A vk = v * s.beta2 + (s.omb2 * gk) * gk;
  A vu = vk;
  if (amsgrad) {
    const A old = vmax;
    vu = ((old > vk) | (old != old)) ? old : vk;  // torch.maximum: NaN propagates
    vmax = vu;
  }
  m = mk;
  v = vk;
  return w + (t.neg_step_size * mk) / (sqrt_rn(vu) / t.bc2_sqrt + s.eps);
}

}  // namespace amp_engine::math
