// Argument checks shared by the CPU and CUDA kernels. Every message names the
// argument, the value given and what is allowed; TORCH_CHECK_VALUE / _TYPE
// surface in Python as ValueError / TypeError.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <functional>
#include <optional>
#include <vector>

namespace amp_engine {

inline bool is_grad_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kHalf || t == c10::kBFloat16 || t == c10::kDouble;
}

// A list of same-device, strided, floating tensors (fp32/fp16/bf16/fp64).
// Returns the common device (CPU for an empty list).
inline c10::Device check_tensor_list(at::TensorList ts, const char* name) {
  if (ts.empty()) return c10::Device(c10::kCPU);
  const c10::Device dev = ts[0].device();
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    TORCH_CHECK_VALUE(t.defined(), name, "[", i, "] is None; pass only tensors that have a value");
    TORCH_CHECK_VALUE(t.layout() == c10::kStrided, name, "[", i, "] has layout ", t.layout(),
                      "; only dense (strided) tensors are allowed (coalesce/densify sparse grads first)");
    TORCH_CHECK_TYPE(is_grad_dtype(t.scalar_type()), name, "[", i, "] has dtype ", t.scalar_type(),
                     "; allowed: float32, float16, bfloat16, float64");
    TORCH_CHECK_VALUE(t.device() == dev, name, " must all be on one device: ", name, "[0] is on ",
                      dev, " but ", name, "[", i, "] is on ", t.device());
  }
  return dev;
}

// A one-element tensor of the given dtype on `dev` (found_inf, inv_scale, scale, ...).
inline void check_scalar_tensor(const at::Tensor& t, const char* name, c10::ScalarType dtype,
                                c10::Device dev) {
  TORCH_CHECK_VALUE(t.defined(), name, " is None; expected a one-element ", dtype, " tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), "; expected ",
                   dtype);
  TORCH_CHECK_VALUE(t.numel() == 1, name, " has shape ", t.sizes(),
                    "; expected a one-element (0-dim) tensor");
  TORCH_CHECK_VALUE(t.device() == dev, name, " is on ", t.device(), " but the tensors are on ", dev);
}

// counts: int64 [n], contiguous, on `dev`.
inline void check_counts(const at::Tensor& counts, size_t n, c10::Device dev) {
  TORCH_CHECK_TYPE(counts.scalar_type() == c10::kLong, "counts has dtype ", counts.scalar_type(),
                   "; expected int64");
  TORCH_CHECK_VALUE(counts.dim() == 1 && static_cast<size_t>(counts.size(0)) == n,
                    "counts has shape ", counts.sizes(), "; expected [", n, "] (one slot per tensor)");
  TORCH_CHECK_VALUE(counts.is_contiguous(), "counts must be contiguous");
  TORCH_CHECK_VALUE(counts.device() == dev, "counts is on ", counts.device(),
                    " but the tensors are on ", dev);
}

// The checks shared by unscale_and_check_ / grad_norm_and_check on every
// backend; returns the device (found_inf's for an empty list).
inline c10::Device check_grad_check_args(at::TensorList grads, const at::Tensor& inv_scale,
                                         const at::Tensor& found_inf,
                                         const std::optional<at::Tensor>& counts) {
  const c10::Device dev = grads.empty() ? found_inf.device() : check_tensor_list(grads, "grads");
  check_scalar_tensor(inv_scale, "inv_scale", c10::kFloat, dev);
  check_scalar_tensor(found_inf, "found_inf", c10::kFloat, dev);
  if (counts.has_value() && counts->defined()) check_counts(*counts, grads.size(), dev);
  return dev;
}

// Kernels walk each tensor's memory as one flat array, which is right for any
// non-overlapping dense layout (permuted strides included). Other views are
// replaced by contiguous copies; for in-place ops the caller copies them back.
struct DenseList {
  std::vector<at::Tensor> tensors;  // what the kernel sees
  std::vector<size_t> copied;       // indices that are temporaries
};

inline DenseList make_dense(at::TensorList ts) {
  DenseList out;
  out.tensors.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i].is_non_overlapping_and_dense()) {
      out.tensors.push_back(ts[i]);
    } else {
      out.tensors.push_back(ts[i].contiguous());
      out.copied.push_back(i);
    }
  }
  return out;
}

inline void copy_back(at::TensorList originals, DenseList& dense) {
  for (size_t i : dense.copied) {
    at::Tensor dst = originals[i];
    dst.copy_(dense.tensors[i]);
  }
}

// Indices of `ts` grouped by dtype, in first-seen order: one launch per group.
inline std::vector<std::vector<size_t>> group_by_dtype(const std::vector<at::Tensor>& ts) {
  std::vector<std::vector<size_t>> groups;
  std::vector<c10::ScalarType> keys;
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto st = ts[i].scalar_type();
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

inline void check_update_scale_args(const at::Tensor& scale, const at::Tensor& growth_tracker,
                                    const at::Tensor& hysteresis_tracker,
                                    const at::Tensor& found_inf, double growth_factor,
                                    double backoff_factor, int64_t growth_interval,
                                    int64_t hysteresis, double min_scale, double max_scale) {
  const c10::Device dev = scale.device();
  check_scalar_tensor(scale, "scale", c10::kFloat, dev);
  check_scalar_tensor(growth_tracker, "growth_tracker", c10::kInt, dev);
  check_scalar_tensor(hysteresis_tracker, "hysteresis_tracker", c10::kInt, dev);
  check_scalar_tensor(found_inf, "found_inf", c10::kFloat, dev);
  TORCH_CHECK_VALUE(growth_factor > 1.0, "growth_factor must be > 1, got ", growth_factor);
  TORCH_CHECK_VALUE(backoff_factor > 0.0 && backoff_factor < 1.0,
                    "backoff_factor must be in (0, 1), got ", backoff_factor);
  TORCH_CHECK_VALUE(growth_interval >= 1, "growth_interval must be >= 1, got ", growth_interval);
  TORCH_CHECK_VALUE(hysteresis >= 1, "hysteresis must be >= 1, got ", hysteresis);
  TORCH_CHECK_VALUE(min_scale > 0.0, "min_scale must be > 0, got ", min_scale);
  TORCH_CHECK_VALUE(max_scale >= min_scale, "max_scale (", max_scale,
                    ") must be >= min_scale (", min_scale, ")");
}

}  // namespace amp_engine
