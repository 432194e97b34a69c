// Every schema of the amp_engine op library, in one place. Kernels live in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); their arithmetic in
// csrc/math/, their argument checks in csrc/checks.h and csrc/optim_checks.h.
// Fake kernels for torch.compile are registered from Python
// (amp_engine/ops/dispatch.py and amp_engine/ops/optim_steps.py).
//
// The library is built on the LibTorch stable ABI only (torch/csrc/stable,
// torch/headeronly), for TORCH_TARGET_VERSION 2.11: one build, made against any
// torch from 2.11 on, loads and runs on every torch from 2.11 on.
//
// Conventions shared by every op (see DESIGN.md §2):
//   * scalars that change during training (inv_scale, found_inf, scale, lr, ...)
//     are 1-element fp32 device tensors, so nothing syncs with the host;
//   * found_inf is a flag: set to 1.0 when something is non-finite, never reset;
//   * a tensor list may mix dtypes (one launch per dtype group), never devices.
#include <Python.h>
#include <torch/csrc/stable/library.h>

#include <tuple>

#include "errors.h"
#include "tensors.h"

// An importable, empty `amp_engine._C` module (Python's limited API): importing
// it runs the static registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

STABLE_TORCH_LIBRARY(amp_engine, m) {
  // grads *= inv_scale in place; found_inf = 1 if any element is non-finite
  // before or after scaling; counts[i] += non-finite elements of grads[i].
  m.def(
      "unscale_and_check_(Tensor(a!)[] grads, Tensor inv_scale, Tensor(b!) found_inf, "
      "Tensor(c!)? counts) -> ()");
  // Read-only: (L2 norm of the unscaled grads as fp32 0-dim, per-tensor norms
  // fp32 [n] when per_tensor else [0]); found_inf and counts as above. With
  // max_norm the clip is computed where the norm is (no op of its own):
  // clip_coef = torch's clamp(max_norm / (total + 1e-6), max=1) and step_scale =
  // inv_scale * clip_coef (what a fused step multiplies the scaled grads by).
  m.def(
      "grad_norm_and_check(Tensor[] grads, Tensor inv_scale, Tensor(a!) found_inf, "
      "Tensor(b!)? counts, bool per_tensor, float? max_norm=None, Tensor(c!)? clip_coef=None, "
      "Tensor(d!)? step_scale=None) -> (Tensor, Tensor)");
  // torch._amp_update_scale_ plus hysteresis and [min_scale, max_scale] bounds,
  // and the step's bookkeeping in the same launch (each output optional;
  // amp_engine/ops/reference/scaling.py after_update_): inv_scale = fp32(1 /
  // fp64(new scale)); next_found_inf = 0 (the flag the next step sets);
  // counters int64 [3] = (updates, overflow updates, last update above
  // min_scale); ring row counters[1] % rows = [update index, counts...].
  m.def(
      "update_scale_(Tensor(a!) scale, Tensor(b!) growth_tracker, Tensor(c!) hysteresis_tracker, "
      "Tensor found_inf, float growth_factor, float backoff_factor, int growth_interval, "
      "int hysteresis, float min_scale, float max_scale, Tensor(d!)? inv_scale=None, "
      "Tensor(e!)? next_found_inf=None, Tensor(f!)? counters=None, Tensor? counts=None, "
      "Tensor(g!)? ring=None) -> ()");

  // ---- fused optimizer steps ------------------------------------------------------
  // One call updates a whole list of params on one device (one launch per dtype
  // group inside). Contract (the truth: amp_engine/ops/reference/optim.py):
  //   * found_inf (fp32, one element) != 0 -> nothing changes at all (params,
  //     masters, moments, steps, rng_state); None -> always applied;
  //   * g = float(grad) * inv_scale (inv_scale = clip_coef / grad_scale, fp32
  //     one-element, combined by the caller on the device; None -> 1), read once
  //     in the grad's own dtype; the update is done in fp32 (fp64 for fp64 params);
  //   * masters: [] (params updated in their own precision, via fp32) or one fp32
  //     master per param (fp16/bf16 params only); the param is then written from
  //     the master, round-to-nearest-even, or stochastic rounding for bf16 params
  //     when stochastic_rounding (random bits from rng_state = int64 [seed, counter]);
  //   * moments fp32 (fp64 for fp64 params), same shape as the param;
  //   * steps: one fp32 one-element tensor per param, += 1 on the device when applied
  //     (bias correction uses the incremented value); rng_state counter += 1 then too;
  //   * lr = lr_tensor (fp32/fp64 one element on the params' device) if given, else lr.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] masters, "
      "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, "
      "Tensor(f!)[] steps, Tensor? lr_tensor, float lr, Tensor? inv_scale, Tensor? found_inf, "
      "Tensor(g!)? rng_state, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled, bool amsgrad, bool maximize, bool stochastic_rounding) -> ()");
  // SGD (torch's formulas); momentum_buffers [] when momentum == 0. A buffer whose
  // step is 0 is initialised to the (decayed) grad, so a skipped first step leaves
  // nothing half-initialised.
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] masters, "
      "Tensor(c!)[] momentum_buffers, Tensor(d!)[] steps, Tensor? lr_tensor, float lr, "
      "Tensor? inv_scale, Tensor? found_inf, Tensor(e!)? rng_state, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool stochastic_rounding) -> ()");
  // Adam / AdamW (no amsgrad) whose moments are, per param, fp32, bf16 (written
  // nearest-even) or uint8 = 8-bit blocks of 256 row-major elements with one fp32
  // absmax each (format and truth: amp_engine/ops/moments8.py and
  // ops/reference/moments8.py). *_absmax: [] when no such moment is uint8, else
  // one per param (read and rewritten for a uint8 moment, unused otherwise).
  // fp32/fp16/bf16 params; otherwise the contract of adam_step_, and found_inf != 0
  // leaves codes and absmax bitwise unchanged too.
  m.def(
      "adam_step_compact_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] masters, "
      "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] exp_avg_absmax, "
      "Tensor(f!)[] exp_avg_sq_absmax, Tensor(g!)[] steps, Tensor? lr_tensor, float lr, "
      "Tensor? inv_scale, Tensor? found_inf, Tensor(h!)? rng_state, float beta1, float beta2, "
      "float eps, float weight_decay, bool decoupled, bool maximize, "
      "bool stochastic_rounding) -> ()");
  // ---- end of fused optimizer steps -----------------------------------------------
}

namespace amp_engine {
namespace {
// Sparse grads would otherwise reach the dispatcher's "no kernel for SparseCPU"
// NotImplementedError; name the argument instead, like every other bad input.
[[noreturn]] void reject_sparse(const char* op) {
  throw_value_error(detail::concat(
      "amp_engine::", op,
      ": grads contains a sparse tensor (layout torch.sparse_*); only dense (strided) tensors "
      "are allowed (coalesce/densify sparse grads first)"));
}

void unscale_and_check_sparse(TensorList, Tensor, Tensor, OptTensor) {
  reject_sparse("unscale_and_check_");
}
std::tuple<Tensor, Tensor> grad_norm_and_check_sparse(TensorList, Tensor, Tensor, OptTensor, bool) {
  reject_sparse("grad_norm_and_check");
}
void adam_step_sparse(TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
                      TensorList, OptTensor, double, OptTensor, OptTensor, OptTensor, double,
                      double, double, double, bool, bool, bool, bool) {
  reject_sparse("adam_step_");
}
void adam_step_compact_sparse(TensorList, TensorList, TensorList, TensorList, TensorList,
                              TensorList, TensorList, TensorList, OptTensor, double, OptTensor,
                              OptTensor, OptTensor, double, double, double, double, bool, bool,
                              bool) {
  reject_sparse("adam_step_compact_");
}
void sgd_step_sparse(TensorList, TensorList, TensorList, TensorList, TensorList, OptTensor,
                     double, OptTensor, OptTensor, OptTensor, double, double, double, bool, bool,
                     bool) {
  reject_sparse("sgd_step_");
}
}  // namespace
}  // namespace amp_engine

#define AMP_ENGINE_REJECT_SPARSE(KEY)                                                    \
  STABLE_TORCH_LIBRARY_IMPL(amp_engine, KEY, m) {                                        \
    m.impl("unscale_and_check_", TORCH_BOX(&amp_engine::unscale_and_check_sparse));     \
    m.impl("grad_norm_and_check", TORCH_BOX(&amp_engine::grad_norm_and_check_sparse));   \
    m.impl("adam_step_", TORCH_BOX(&amp_engine::adam_step_sparse));                       \
    m.impl("sgd_step_", TORCH_BOX(&amp_engine::sgd_step_sparse));                         \
    m.impl("adam_step_compact_", TORCH_BOX(&amp_engine::adam_step_compact_sparse));       \
  }
AMP_ENGINE_REJECT_SPARSE(SparseCPU)
AMP_ENGINE_REJECT_SPARSE(SparseCUDA)
