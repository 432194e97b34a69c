// Argument checks of the fused optimizer-step ops (adam_step_, sgd_step_),
// shared by their CPU and CUDA kernels: the kernels call check_adam_args /
// check_sgd_args first and nothing else. They mirror
// amp_engine/ops/optim_steps.check_step_args (the Python backends' checks);
// messages name the argument, the value given and what is allowed.
#pragma once
#include "checks.h"

namespace amp_engine::optim {

inline void check_same_list(const TensorList& ts, const TensorList& params, const char* name,
                            const Device& dev) {
  AMP_CHECK_VALUE(ts.size() == params.size(), name, " has ", ts.size(), " tensors; expected ",
                  params.size(), " (one per param)");
  if (ts.empty()) return;
  check_tensor_list(ts, name);
  const Device d0 = ts[0].device();
  AMP_CHECK_VALUE(same_device(d0, dev), name, "[0] is on ", amp_engine::name(d0),
                  " but params[0] is on ", amp_engine::name(dev),
                  "; one call takes tensors of one device");
  for (size_t i = 0; i < ts.size(); ++i) {
    AMP_CHECK_VALUE(same_sizes(ts[i], params[i]), name, "[", i, "] has shape ", shape(ts[i]),
                    " but params[", i, "] has shape ", shape(params[i]));
  }
}

inline ScalarType acc_type(ScalarType param) {
  return param == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// Moments/buffers: fp32, fp64 for fp64 params.
inline void check_state_list(const TensorList& ts, const TensorList& params, const char* name,
                             const Device& dev) {
  check_same_list(ts, params, name, dev);
  for (size_t i = 0; i < ts.size(); ++i) {
    const ScalarType want = acc_type(params[i].scalar_type());
    AMP_CHECK_TYPE(ts[i].scalar_type() == want, name, "[", i, "] has dtype ",
                   amp_engine::name(ts[i].scalar_type()), "; expected ", amp_engine::name(want),
                   " for a ", amp_engine::name(params[i].scalar_type()), " param");
  }
}

// The arguments both ops share. Returns the params' device.
inline Device check_common(const TensorList& params, const TensorList& grads,
                           const TensorList& masters, const TensorList& steps,
                           const OptTensor& lr_tensor, double lr, const OptTensor& inv_scale,
                           const OptTensor& found_inf, const OptTensor& rng_state,
                           bool stochastic_rounding) {
  const Device dev = check_tensor_list(params, "params");
  check_same_list(grads, params, "grads", dev);
  if (!masters.empty()) {
    check_same_list(masters, params, "masters", dev);
    for (size_t i = 0; i < masters.size(); ++i) {
      const ScalarType pt = params[i].scalar_type();
      AMP_CHECK_TYPE(pt == ScalarType::Half || pt == ScalarType::BFloat16, "masters[", i,
                     "] given for a ", amp_engine::name(pt),
                     " param; fp32 masters are for float16/bfloat16 params only (pass masters=[] "
                     "otherwise)");
      AMP_CHECK_TYPE(masters[i].scalar_type() == ScalarType::Float, "masters[", i,
                     "] has dtype ", amp_engine::name(masters[i].scalar_type()),
                     "; expected float32 for a ", amp_engine::name(pt), " param");
    }
  }
  AMP_CHECK_VALUE(steps.size() == params.size(), "steps has ", steps.size(),
                  " tensors; expected ", params.size(), " (one per param)");
  for (size_t i = 0; i < steps.size(); ++i) {
    check_scalar_tensor(steps[i], "steps", ScalarType::Float, dev, static_cast<int64_t>(i));
  }
  if (lr_tensor.has_value()) {
    const ScalarType st = lr_tensor->scalar_type();
    AMP_CHECK_TYPE(st == ScalarType::Float || st == ScalarType::Double, "lr_tensor has dtype ",
                   amp_engine::name(st), "; expected float32 or float64");
    check_scalar_tensor(*lr_tensor, "lr_tensor", st, dev);
  } else {
    AMP_CHECK_VALUE(lr >= 0.0, "lr must be >= 0, got ", lr);
  }
  if (inv_scale.has_value()) check_scalar_tensor(*inv_scale, "inv_scale", ScalarType::Float, dev);
  if (found_inf.has_value()) check_scalar_tensor(*found_inf, "found_inf", ScalarType::Float, dev);
  if (rng_state.has_value()) {
    const Tensor& r = *rng_state;
    const Device rd = r.device();
    AMP_CHECK_VALUE(r.scalar_type() == ScalarType::Long && r.dim() == 1 && r.size(0) == 2 &&
                        same_device(rd, dev),
                    "rng_state must be an int64 tensor of shape [2] (seed, counter) on ",
                    amp_engine::name(dev), "; got ", amp_engine::name(r.scalar_type()), " ",
                    shape(r), " on ", amp_engine::name(rd));
  } else if (stochastic_rounding) {
    for (const Tensor& p : params) {
      AMP_CHECK_VALUE(p.scalar_type() != ScalarType::BFloat16,
                      "stochastic_rounding=True with bfloat16 params needs rng_state "
                      "(int64 [seed, counter])");
    }
  }
  return dev;
}

// Every check of adam_step_; returns the params' device.
inline Device check_adam_args(const TensorList& params, const TensorList& grads,
                              const TensorList& masters, const TensorList& exp_avgs,
                              const TensorList& exp_avg_sqs, const TensorList& max_exp_avg_sqs,
                              const TensorList& steps, const OptTensor& lr_tensor, double lr,
                              const OptTensor& inv_scale, const OptTensor& found_inf,
                              const OptTensor& rng_state, double beta1, double beta2, double eps,
                              double weight_decay, bool amsgrad, bool stochastic_rounding) {
  const Device dev = check_common(params, grads, masters, steps, lr_tensor, lr, inv_scale,
                                  found_inf, rng_state, stochastic_rounding);
  AMP_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  AMP_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  AMP_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  AMP_CHECK_VALUE(weight_decay >= 0.0, "weight_decay must be >= 0, got ", weight_decay);
  check_state_list(exp_avgs, params, "exp_avgs", dev);
  check_state_list(exp_avg_sqs, params, "exp_avg_sqs", dev);
  if (amsgrad) check_state_list(max_exp_avg_sqs, params, "max_exp_avg_sqs", dev);
  return dev;
}

// Every check of sgd_step_; returns the params' device.
inline Device check_sgd_args(const TensorList& params, const TensorList& grads,
                             const TensorList& masters, const TensorList& momentum_buffers,
                             const TensorList& steps, const OptTensor& lr_tensor, double lr,
                             const OptTensor& inv_scale, const OptTensor& found_inf,
                             const OptTensor& rng_state, double momentum, double dampening,
                             double weight_decay, bool nesterov, bool stochastic_rounding) {
  const Device dev = check_common(params, grads, masters, steps, lr_tensor, lr, inv_scale,
                                  found_inf, rng_state, stochastic_rounding);
  AMP_CHECK_VALUE(momentum >= 0.0, "momentum must be >= 0, got ", momentum);
  AMP_CHECK_VALUE(weight_decay >= 0.0, "weight_decay must be >= 0, got ", weight_decay);
  AMP_CHECK_VALUE(!nesterov || (momentum > 0.0 && dampening == 0.0),
                  "nesterov=True requires momentum > 0 and dampening == 0, got momentum=",
                  momentum, ", dampening=", dampening);
  if (momentum != 0.0) check_state_list(momentum_buffers, params, "momentum_buffers", dev);
  return dev;
}

// The tensors of one param (param first) walked as flat arrays: as they are
// when all are dense with the param's layout, else as contiguous copies that
// are written back afterwards (`writable` marks the ones the step changes).
struct Entry {
  TensorList work;      // what the kernel walks
  TensorList original;  // what the caller passed
  std::vector<bool> writable;
  bool copied = false;
};

// `ts` as the kernel walks them: the tensors themselves when `walk`, else contiguous
// copies of all of them (write_back copies the writable ones back).
inline Entry entry_of(TensorList ts, std::vector<bool> writable, bool walk) {
  Entry e;
  e.writable = std::move(writable);
  e.copied = !walk;
  if (walk) {
    e.work = std::move(ts);
  } else {
    e.original = ts;
    for (const Tensor& t : ts) e.work.push_back(torch::stable::contiguous(t));
  }
  return e;
}

inline Entry make_entry(TensorList ts, std::vector<bool> writable) {
  bool walk = true;
  for (const Tensor& t : ts) walk = walk && is_dense(t) && same_layout(t, ts[0]);
  return entry_of(std::move(ts), std::move(writable), walk);
}

inline void write_back(Entry& e) {
  if (!e.copied) return;
  for (size_t k = 0; k < e.work.size(); ++k) {
    if (e.writable[k]) torch::stable::copy_(e.original[k], e.work[k]);
  }
}

}  // namespace amp_engine::optim
