// Argument checks of the loss-scaling ops, shared by the CPU and CUDA kernels
// (the fused optimizer steps: optim_checks.h). Every message names the
// argument, the value given and what is allowed; AMP_CHECK_VALUE / _TYPE
// surface in Python as ValueError / TypeError (errors.h).
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

#include "errors.h"
#include "tensors.h"

namespace amp_engine {

inline bool is_grad_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16 ||
         t == ScalarType::Double;
}

// A list of same-device, strided, floating tensors (fp32/fp16/bf16/fp64).
// Returns the common device (CPU for an empty list).
inline Device check_tensor_list(const TensorList& ts, const char* name) {
  if (ts.empty()) return Device(DeviceType::CPU);
  const Device dev = ts[0].device();
  for (size_t i = 0; i < ts.size(); ++i) {
    const Tensor& t = ts[i];
    AMP_CHECK_VALUE(t.defined(), name, "[", i, "] is None; pass only tensors that have a value");
    AMP_CHECK_VALUE(t.layout() == Layout::Strided, name, "[", i, "] has layout ",
                    layout_name(t.layout()),
                    "; only dense (strided) tensors are allowed (coalesce/densify sparse grads first)");
    AMP_CHECK_TYPE(is_grad_dtype(t.scalar_type()), name, "[", i, "] has dtype ",
                   amp_engine::name(t.scalar_type()), "; allowed: float32, float16, bfloat16, float64");
    const Device d = t.device();
    AMP_CHECK_VALUE(same_device(d, dev), name, " must all be on one device: ", name, "[0] is on ",
                    amp_engine::name(dev), " but ", name, "[", i, "] is on ", amp_engine::name(d));
  }
  return dev;
}

// A one-element tensor of the given dtype on `dev` (found_inf, inv_scale, scale, ...).
// `index` >= 0 prints the name as name[index] (lists of scalars: steps).
inline void check_scalar_tensor(const Tensor& t, const char* name, ScalarType dtype,
                                const Device& dev, int64_t index = -1) {
  const std::string n = index < 0 ? std::string(name) : detail::concat(name, "[", index, "]");
  AMP_CHECK_VALUE(t.defined(), n, " is None; expected a one-element ", amp_engine::name(dtype),
                  " tensor");
  AMP_CHECK_TYPE(t.scalar_type() == dtype, n, " has dtype ", amp_engine::name(t.scalar_type()),
                 "; expected ", amp_engine::name(dtype));
  AMP_CHECK_VALUE(t.numel() == 1, n, " has shape ", shape(t),
                  "; expected a one-element (0-dim) tensor");
  const Device d = t.device();
  AMP_CHECK_VALUE(same_device(d, dev), n, " is on ", amp_engine::name(d),
                  " but the tensors are on ", amp_engine::name(dev));
}

// counts: int64 [n], contiguous, on `dev`.
inline void check_counts(const Tensor& counts, size_t n, const Device& dev) {
  AMP_CHECK_TYPE(counts.scalar_type() == ScalarType::Long, "counts has dtype ",
                 amp_engine::name(counts.scalar_type()), "; expected int64");
  AMP_CHECK_VALUE(counts.dim() == 1 && static_cast<size_t>(counts.size(0)) == n,
                  "counts has shape ", shape(counts), "; expected [", n,
                  "] (one slot per tensor)");
  AMP_CHECK_VALUE(counts.is_contiguous(), "counts must be contiguous");
  const Device d = counts.device();
  AMP_CHECK_VALUE(same_device(d, dev), "counts is on ", amp_engine::name(d),
                  " but the tensors are on ", amp_engine::name(dev));
}

// The checks shared by unscale_and_check_ / grad_norm_and_check on every
// backend; returns the device (found_inf's for an empty list).
inline Device check_grad_check_args(const TensorList& grads, const Tensor& inv_scale,
                                    const Tensor& found_inf, const OptTensor& counts) {
  const Device dev = grads.empty() ? found_inf.device() : check_tensor_list(grads, "grads");
  check_scalar_tensor(inv_scale, "inv_scale", ScalarType::Float, dev);
  check_scalar_tensor(found_inf, "found_inf", ScalarType::Float, dev);
  if (counts.has_value() && counts->defined()) check_counts(*counts, grads.size(), dev);
  return dev;
}

// Kernels walk each tensor's memory as one flat array, which is right for any
// non-overlapping dense layout (permuted strides included). Other views are
// replaced by contiguous copies; for in-place ops the caller copies them back.
struct DenseList {
  TensorList tensors;          // what the kernel sees
  std::vector<size_t> copied;  // indices that are temporaries
};

inline DenseList make_dense(const TensorList& ts) {
  DenseList out;
  out.tensors.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i].numel() == 0 || is_dense(ts[i])) {
      out.tensors.push_back(ts[i]);
    } else {
      out.tensors.push_back(torch::stable::contiguous(ts[i]));
      out.copied.push_back(i);
    }
  }
  return out;
}

inline void copy_back(const TensorList& originals, DenseList& dense) {
  for (size_t i : dense.copied) {
    Tensor dst = originals[i];
    torch::stable::copy_(dst, dense.tensors[i]);
  }
}

// Indices of `ts` grouped by dtype, in first-seen order: one launch per group.
inline std::vector<std::vector<size_t>> group_by_dtype(const TensorList& ts) {
  std::vector<std::vector<size_t>> groups;
  std::vector<ScalarType> keys;
  for (size_t i = 0; i < ts.size(); ++i) {
    const ScalarType st = ts[i].scalar_type();
    size_t g = 0;
    while (g < keys.size() && keys[g] != st) ++g;
    if (g == keys.size()) {
      keys.push_back(st);
      groups.emplace_back();
    }
    groups[g].push_back(i);
  }
  return groups;
}

inline void check_update_scale_args(const Tensor& scale, const Tensor& growth_tracker,
                                    const Tensor& hysteresis_tracker, const Tensor& found_inf,
                                    double growth_factor, double backoff_factor,
                                    int64_t growth_interval, int64_t hysteresis, double min_scale,
                                    double max_scale) {
  const Device dev = scale.device();
  check_scalar_tensor(scale, "scale", ScalarType::Float, dev);
  check_scalar_tensor(growth_tracker, "growth_tracker", ScalarType::Int, dev);
  check_scalar_tensor(hysteresis_tracker, "hysteresis_tracker", ScalarType::Int, dev);
  check_scalar_tensor(found_inf, "found_inf", ScalarType::Float, dev);
  AMP_CHECK_VALUE(growth_factor > 1.0, "growth_factor must be > 1, got ", growth_factor);
  AMP_CHECK_VALUE(backoff_factor > 0.0 && backoff_factor < 1.0,
                  "backoff_factor must be in (0, 1), got ", backoff_factor);
  AMP_CHECK_VALUE(growth_interval >= 1, "growth_interval must be >= 1, got ", growth_interval);
  AMP_CHECK_VALUE(hysteresis >= 1, "hysteresis must be >= 1, got ", hysteresis);
  // the refill value is stored in the int32 tracker
  AMP_CHECK_VALUE(hysteresis <= INT32_MAX,
                  "hysteresis must be <= 2147483647 (the tracker is int32), got ", hysteresis);
  AMP_CHECK_VALUE(min_scale > 0.0, "min_scale must be > 0, got ", min_scale);
  AMP_CHECK_VALUE(max_scale >= min_scale, "max_scale (", max_scale, ") must be >= min_scale (",
                  min_scale, ")");
}

// update_scale_'s optional bookkeeping outputs (reference.after_update_):
// inv_scale / next_found_inf fp32 one-element; counters int64 [3]; counts int64
// [n] and ring int64 [rows >= 1, 1 + n], contiguous, given together and only
// with counters (the ring's write position is counters[1]).
inline void check_update_bookkeeping_args(const OptTensor& inv_scale,
                                          const OptTensor& next_found_inf,
                                          const OptTensor& counters, const OptTensor& counts,
                                          const OptTensor& ring, const Device& dev) {
  auto given = [](const OptTensor& t) { return t.has_value() && t->defined(); };
  if (given(inv_scale)) check_scalar_tensor(*inv_scale, "inv_scale", ScalarType::Float, dev);
  if (given(next_found_inf)) {
    check_scalar_tensor(*next_found_inf, "next_found_inf", ScalarType::Float, dev);
  }
  if (!given(counters)) {
    AMP_CHECK_VALUE(!given(counts) && !given(ring),
                    "counts / ring given without counters; the ring's write position is "
                    "counters[1]");
    return;
  }
  const Tensor& c = *counters;
  AMP_CHECK_VALUE(c.scalar_type() == ScalarType::Long && c.dim() == 1 && c.size(0) == 3 &&
                      c.is_contiguous(),
                  "counters must be a contiguous int64 tensor of shape [3] (updates, overflow "
                  "updates, last update above the floor); got ",
                  amp_engine::name(c.scalar_type()), " ", shape(c));
  AMP_CHECK_VALUE(same_device(c.device(), dev), "counters is on ", amp_engine::name(c.device()),
                  " but scale is on ", amp_engine::name(dev));
  AMP_CHECK_VALUE(given(counts) == given(ring),
                  "counts and ring go together: the ring keeps snapshots of counts");
  if (!given(ring)) return;
  const Tensor& n = *counts;
  const Tensor& r = *ring;
  AMP_CHECK_VALUE(n.scalar_type() == ScalarType::Long && n.dim() == 1 && n.is_contiguous() &&
                      same_device(n.device(), dev),
                  "counts must be a contiguous 1-D int64 tensor on ", amp_engine::name(dev));
  AMP_CHECK_VALUE(r.scalar_type() == ScalarType::Long && r.dim() == 2 && r.size(0) >= 1 &&
                      r.size(1) == n.size(0) + 1 && r.is_contiguous() &&
                      same_device(r.device(), dev),
                  "ring must be a contiguous int64 tensor [rows >= 1, ", n.size(0) + 1,
                  "] (the update index, then counts) on ", amp_engine::name(dev), "; got ",
                  amp_engine::name(r.scalar_type()), " ", shape(r));
}

// grad_norm_and_check's clip outputs: written only when max_norm is given.
inline void check_clip_args(const std::optional<double>& max_norm, const OptTensor& clip_coef,
                            const OptTensor& step_scale, const Device& dev) {
  auto given = [](const OptTensor& t) { return t.has_value() && t->defined(); };
  if (!max_norm.has_value()) {
    AMP_CHECK_VALUE(!given(clip_coef) && !given(step_scale),
                    "clip_coef / step_scale given without max_norm; pass max_norm (the clip "
                    "threshold) to have them written");
    return;
  }
  AMP_CHECK_VALUE(*max_norm >= 0.0, "max_norm must be >= 0, got ", *max_norm);
  if (given(clip_coef)) check_scalar_tensor(*clip_coef, "clip_coef", ScalarType::Float, dev);
  if (given(step_scale)) check_scalar_tensor(*step_scale, "step_scale", ScalarType::Float, dev);
}

}  // namespace amp_engine
