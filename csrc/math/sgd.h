// The SGD update of one element (torch's formulas: momentum, dampening,
// nesterov, L2 weight decay), as amp_engine/ops/reference/optim.py computes it.
#pragma once
#include "math/hd.h"

namespace amp_engine::math {

template <typename A>
struct SgdCoeffs {
  A grad_mul;             // inv_scale, negated for maximize
  A wd, momentum, one_minus_dampening, neg_lr;
};

template <typename A>
AMP_ENGINE_HD inline SgdCoeffs<A> sgd_coeffs(A inv_scale, double lr, double momentum,
                                             double dampening, double wd, bool maximize) {
  return {maximize ? -inv_scale : inv_scale, static_cast<A>(wd), static_cast<A>(momentum),
          static_cast<A>(1.0 - dampening), static_cast<A>(-lr)};
}

// kNone: no buffer; kFirst: the step counter is 0 and the buffer takes the
// (decayed) grad, torch's first step; kHeavyBall: buf = buf * momentum + (1 - dampening) * g.
enum class Momentum { kNone, kFirst, kHeavyBall };

template <typename A>
AMP_ENGINE_HD inline A sgd_update(const SgdCoeffs<A>& s, bool decay, Momentum mom, bool nesterov,
                                  A g, A w, A& buf) {
  A gk = g * s.grad_mul;
  if (decay) gk = gk + s.wd * w;
  if (mom != Momentum::kNone) {
    const A bk = mom == Momentum::kFirst ? gk : buf * s.momentum + s.one_minus_dampening * gk;
    buf = bk;
    gk = nesterov ? gk + s.momentum * bk : bk;
  }
  return w + s.neg_lr * gk;
}

}  // namespace amp_engine::math
