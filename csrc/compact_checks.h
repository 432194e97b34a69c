// Argument checks and the row-major work layout of adam_step_compact_ (Adam /
// AdamW with fp32, bf16 or 8-bit block moments), shared by its CPU and CUDA
// kernels. They mirror amp_engine/ops/compact_steps.py (the Python backends'
// checks); messages name the argument, the value given and what is allowed.
#pragma once
#include "math/moments8.h"
#include "optim_checks.h"

namespace amp_engine::optim {

// What a moment's dtype means (amp_engine/ops/moments8.py is the format).
enum class MomentFormat : int { kFloat = 0, kBFloat16 = 1, kBlocks8 = 2 };

inline MomentFormat moment_format(ScalarType st) {
  return st == ScalarType::Byte       ? MomentFormat::kBlocks8
         : st == ScalarType::BFloat16 ? MomentFormat::kBFloat16
                                      : MomentFormat::kFloat;
}

inline int64_t n_blocks8(int64_t numel) { return (numel + m8::kBlock - 1) / m8::kBlock; }

// A list of moments (one per param): fp32, bf16 or uint8 codes; a uint8 one needs
// its absmax entry (fp32, contiguous, [ceil(numel / 256)]).
inline void check_compact_moments(const TensorList& ts, const TensorList& absmax,
                                  const TensorList& params, const char* name,
                                  const char* absmax_name, const Device& dev) {
  AMP_CHECK_VALUE(ts.size() == params.size(), name, " has ", ts.size(), " tensors; expected ",
                  params.size(), " (one per param)");
  AMP_CHECK_VALUE(absmax.empty() || absmax.size() == params.size(), absmax_name, " has ",
                  absmax.size(), " tensors; expected 0 (no uint8 moments) or ", params.size(),
                  " (one per param; any tensor where the moment is not uint8)");
  for (size_t i = 0; i < ts.size(); ++i) {
    const Tensor& t = ts[i];
    AMP_CHECK_VALUE(t.defined(), name, "[", i, "] is None; pass only tensors that have a value");
    const ScalarType st = t.scalar_type();
    AMP_CHECK_TYPE(st == ScalarType::Float || st == ScalarType::BFloat16 || st == ScalarType::Byte,
                   name, "[", i, "] has dtype ", amp_engine::name(st),
                   "; allowed: float32, bfloat16, uint8 (8-bit blocks)");
    AMP_CHECK_VALUE(t.layout() == Layout::Strided, name, "[", i, "] has layout ",
                    layout_name(t.layout()), "; only dense (strided) tensors are allowed");
    AMP_CHECK_VALUE(same_sizes(t, params[i]), name, "[", i, "] has shape ", shape(t),
                    " but params[", i, "] has shape ", shape(params[i]));
    AMP_CHECK_VALUE(same_device(t.device(), dev), name, "[", i, "] is on ",
                    amp_engine::name(t.device()), " but params[", i, "] is on ",
                    amp_engine::name(dev));
    if (st != ScalarType::Byte) continue;
    AMP_CHECK_VALUE(t.is_contiguous(), name, "[", i,
                    "] (8-bit codes) must be contiguous (row-major blocks)");
    const int64_t want = n_blocks8(params[i].numel());
    const bool ok = i < absmax.size() && absmax[i].defined() &&
                    absmax[i].scalar_type() == ScalarType::Float && absmax[i].dim() == 1 &&
                    absmax[i].size(0) == want && same_device(absmax[i].device(), dev) &&
                    absmax[i].is_contiguous();
    if (!ok && i < absmax.size() && absmax[i].defined()) {
      const Tensor& a = absmax[i];
      throw_value_error(detail::concat(
          name, "[", i, "] is uint8 (8-bit blocks) and needs ", absmax_name, "[", i,
          "]: a contiguous float32 tensor of shape [", want, "] on ", amp_engine::name(dev),
          "; got ", amp_engine::name(a.scalar_type()), " ", shape(a), " on ",
          amp_engine::name(a.device())));
    }
    AMP_CHECK_VALUE(ok, name, "[", i, "] is uint8 (8-bit blocks) and needs ", absmax_name, "[",
                    i, "]: a contiguous float32 tensor of shape [", want, "] on ",
                    amp_engine::name(dev), "; got none");
  }
}

// Every check of adam_step_compact_; returns the params' device.
inline Device check_adam_compact_args(
    const TensorList& params, const TensorList& grads, const TensorList& masters,
    const TensorList& exp_avgs, const TensorList& exp_avg_sqs, const TensorList& exp_avg_absmax,
    const TensorList& exp_avg_sq_absmax, const TensorList& steps, const OptTensor& lr_tensor,
    double lr, const OptTensor& inv_scale, const OptTensor& found_inf, const OptTensor& rng_state,
    double beta1, double beta2, double eps, double weight_decay, bool stochastic_rounding) {
  const Device dev = check_common(params, grads, masters, steps, lr_tensor, lr, inv_scale,
                                  found_inf, rng_state, stochastic_rounding);
  AMP_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  AMP_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  AMP_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  AMP_CHECK_VALUE(weight_decay >= 0.0, "weight_decay must be >= 0, got ", weight_decay);
  for (size_t i = 0; i < params.size(); ++i) {
    const ScalarType pt = params[i].scalar_type();
    AMP_CHECK_TYPE(pt == ScalarType::Float || pt == ScalarType::Half || pt == ScalarType::BFloat16,
                   "params[", i, "] has dtype ", amp_engine::name(pt),
                   "; adam_step_compact_ takes float32, float16 and bfloat16 params (fp64 "
                   "params: use adam_step_)");
  }
  check_compact_moments(exp_avgs, exp_avg_absmax, params, "exp_avgs", "exp_avg_absmax", dev);
  check_compact_moments(exp_avg_sqs, exp_avg_sq_absmax, params, "exp_avg_sqs",
                        "exp_avg_sq_absmax", dev);
  return dev;
}

// One param's tensors (param, grad, m, v[, master]) walked as row-major flat
// arrays: 8-bit blocks are row-major runs and the stochastic-rounding offset is
// the row-major index, so any non-contiguous one makes all of them contiguous
// copies (written back afterwards). The absmax lists are flat already.
inline Entry make_row_major_entry(TensorList ts, std::vector<bool> writable) {
  bool walk = true;
  for (const Tensor& t : ts) walk = walk && t.is_contiguous();
  return entry_of(std::move(ts), std::move(writable), walk);
}

// The absmax of param i's moment, or nullptr when the moment is not 8-bit.
inline float* absmax_ptr(const TensorList& moments, const TensorList& absmax, size_t i) {
  return moments[i].scalar_type() == ScalarType::Byte ? ptr<float>(absmax[i]) : nullptr;
}

}  // namespace amp_engine::optim
