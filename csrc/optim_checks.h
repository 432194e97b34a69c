// Argument checks of the fused optimizer-step ops (adam_step_, sgd_step_), shared
// by their CPU kernels and usable by CUDA ones (no CPU-only includes). They mirror
// amp_engine/ops/optim_steps.check_step_args; messages name the argument, the
// value given and what is allowed.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "checks.h"

namespace amp_engine::optim {

inline void check_same_list(at::TensorList ts, at::TensorList params, const char* name,
                            c10::Device dev) {
  TORCH_CHECK_VALUE(ts.size() == params.size(), name, " has ", ts.size(),
                    " tensors; expected ", params.size(), " (one per param)");
  if (ts.empty()) return;
  check_tensor_list(ts, name);
  TORCH_CHECK_VALUE(ts[0].device() == dev, name, "[0] is on ", ts[0].device(),
                    " but params[0] is on ", dev, "; one call takes tensors of one device");
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK_VALUE(ts[i].sizes() == params[i].sizes(), name, "[", i, "] has shape ",
                      ts[i].sizes(), " but params[", i, "] has shape ", params[i].sizes());
  }
}

inline c10::ScalarType acc_type(c10::ScalarType param) {
  return param == c10::kDouble ? c10::kDouble : c10::kFloat;
}

// Moments/buffers: fp32, fp64 for fp64 params.
inline void check_state_list(at::TensorList ts, at::TensorList params, const char* name,
                             c10::Device dev) {
  check_same_list(ts, params, name, dev);
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto want = acc_type(params[i].scalar_type());
    TORCH_CHECK_TYPE(ts[i].scalar_type() == want, name, "[", i, "] has dtype ",
                     ts[i].scalar_type(), "; expected ", want, " for a ",
                     params[i].scalar_type(), " param");
  }
}

// The arguments both ops share. Returns the params' device.
inline c10::Device check_common(at::TensorList params, at::TensorList grads,
                                at::TensorList masters, at::TensorList steps,
                                const c10::optional<at::Tensor>& lr_tensor, double lr,
                                const c10::optional<at::Tensor>& inv_scale,
                                const c10::optional<at::Tensor>& found_inf,
                                const c10::optional<at::Tensor>& rng_state,
                                bool stochastic_rounding) {
  const c10::Device dev = check_tensor_list(params, "params");
  check_same_list(grads, params, "grads", dev);
  if (!masters.empty()) {
    check_same_list(masters, params, "masters", dev);
    for (size_t i = 0; i < masters.size(); ++i) {
      const auto pt = params[i].scalar_type();
      TORCH_CHECK_TYPE(pt == c10::kHalf || pt == c10::kBFloat16, "masters[", i,
                       "] given for a ", pt, " param; fp32 masters are for float16/bfloat16 "
                       "params only (pass masters=[] otherwise)");
      TORCH_CHECK_TYPE(masters[i].scalar_type() == c10::kFloat, "masters[", i, "] has dtype ",
                       masters[i].scalar_type(), "; expected float32 for a ", pt, " param");
    }
  }
  TORCH_CHECK_VALUE(steps.size() == params.size(), "steps has ", steps.size(),
                    " tensors; expected ", params.size(), " (one per param)");
  for (size_t i = 0; i < steps.size(); ++i) {
    check_scalar_tensor(steps[i], "steps[i]", c10::kFloat, dev);
  }
  if (lr_tensor.has_value()) {
    const auto st = lr_tensor->scalar_type();
    TORCH_CHECK_TYPE(st == c10::kFloat || st == c10::kDouble, "lr_tensor has dtype ", st,
                     "; expected float32 or float64");
    check_scalar_tensor(*lr_tensor, "lr_tensor", st, dev);
  } else {
    TORCH_CHECK_VALUE(lr >= 0.0, "lr must be >= 0, got ", lr);
  }
  if (inv_scale.has_value()) check_scalar_tensor(*inv_scale, "inv_scale", c10::kFloat, dev);
  if (found_inf.has_value()) check_scalar_tensor(*found_inf, "found_inf", c10::kFloat, dev);
  if (rng_state.has_value()) {
    const auto& r = *rng_state;
    TORCH_CHECK_VALUE(r.scalar_type() == c10::kLong && r.dim() == 1 && r.size(0) == 2 &&
                          r.device() == dev,
                      "rng_state must be an int64 tensor of shape [2] (seed, counter) on ", dev,
                      "; got ", r.scalar_type(), " ", r.sizes(), " on ", r.device());
  } else if (stochastic_rounding) {
    for (const auto& p : params) {
      TORCH_CHECK_VALUE(p.scalar_type() != c10::kBFloat16,
                        "stochastic_rounding=True with bfloat16 params needs rng_state "
                        "(int64 [seed, counter])");
    }
  }
  return dev;
}

}  // namespace amp_engine::optim
