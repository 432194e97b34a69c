// CUDA kernel of amp_engine::update_scale_: torch._amp_update_scale_ plus
// hysteresis and [min_scale, max_scale] bounds, exactly as
// amp_engine/ops/reference.py's update_scale_. One thread reads the device
// flags and writes the new state, so the host never syncs.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "checks.h"

namespace amp_engine {
namespace cuda {
namespace {

__device__ __forceinline__ bool is_finite_f32(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// int32 `x + d` wrapping like torch's int32 tensor arithmetic (no C++ UB).
__device__ __forceinline__ int32_t wrapping_add(int32_t x, int32_t d) {
  return static_cast<int32_t>(static_cast<uint32_t>(x) + static_cast<uint32_t>(d));
}

// The bounds arrive as fp64 and are compared in fp32, as torch's clamp of an
// fp32 tensor by a Python float does; comparisons written so a NaN scale
// stays NaN (clamp propagates NaN).
__global__ void update_scale_kernel(float* scale, int32_t* growth_tracker,
                                    int32_t* hysteresis_tracker, const float* found_inf,
                                    double growth_factor, double backoff_factor,
                                    int64_t growth_interval, int32_t hysteresis, float min_scale,
                                    float max_scale) {
  const float s = *scale;
  const int32_t ht_minus_one = wrapping_add(*hysteresis_tracker, -1);
  if (*found_inf != 0.0f) {  // a flag: any non-zero value (NaN too) means overflow
    if (ht_minus_one <= 0) {
      // The hysteresis-th consecutive overflow (or later): back off, not below min_scale.
      const float backed = static_cast<float>(static_cast<double>(s) * backoff_factor);
      *scale = backed < min_scale ? min_scale : backed;
    }
    *growth_tracker = 0;
    *hysteresis_tracker = ht_minus_one > 0 ? ht_minus_one : 0;
  } else {
    const int32_t successful = wrapping_add(*growth_tracker, 1);
    if (static_cast<int64_t>(successful) >= growth_interval) {
      const float grown = static_cast<float>(static_cast<double>(s) * growth_factor);
      if (is_finite_f32(grown)) *scale = grown > max_scale ? max_scale : grown;  // never to inf
      *growth_tracker = 0;
    } else {
      *growth_tracker = successful;
    }
    *hysteresis_tracker = hysteresis;  // a clean step refills the hysteresis
  }
}

void update_scale_cuda(const at::Tensor& scale, const at::Tensor& growth_tracker,
                       const at::Tensor& hysteresis_tracker, const at::Tensor& found_inf,
                       double growth_factor, double backoff_factor, int64_t growth_interval,
                       int64_t hysteresis, double min_scale, double max_scale) {
  // dtype/shape/device checks only: the values live on the device (no sync).
  check_update_scale_args(scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor,
                          backoff_factor, growth_interval, hysteresis, min_scale, max_scale);
  TORCH_CHECK_VALUE(scale.device().is_cuda(), "the CUDA kernel got tensors on ", scale.device());
  TORCH_CHECK_VALUE(hysteresis <= INT32_MAX, "hysteresis must fit in int32, got ", hysteresis);
  const c10::cuda::CUDAGuard guard(scale.device());
  update_scale_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(
      scale.data_ptr<float>(), growth_tracker.data_ptr<int32_t>(),
      hysteresis_tracker.data_ptr<int32_t>(), found_inf.data_ptr<float>(), growth_factor,
      backoff_factor, growth_interval, static_cast<int32_t>(hysteresis),
      static_cast<float>(min_scale), static_cast<float>(max_scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace amp_engine

TORCH_LIBRARY_IMPL(amp_engine, CUDA, m) {
  m.impl("update_scale_", &amp_engine::cuda::update_scale_cuda);
}
