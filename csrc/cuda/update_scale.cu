// CUDA kernel of amp_engine::update_scale_: torch._amp_update_scale_ plus
// hysteresis and [min_scale, max_scale] bounds. One thread applies
// math::update_scale (csrc/math/scale_update.h, the rule the CPU kernel runs)
// to the device state, so the host never syncs.
#include <torch/csrc/stable/library.h>

#include <cstdint>

#include "checks.h"
#include "cuda/runtime.cuh"
#include "math/scale_update.h"

namespace amp_engine {
namespace cuda {
namespace {

// The bounds arrive as fp64 and are compared in fp32, as torch's clamp of an
// fp32 tensor by a Python float does.
__global__ void update_scale_kernel(float* scale, int32_t* growth_tracker,
                                    int32_t* hysteresis_tracker, const float* found_inf,
                                    double growth_factor, double backoff_factor,
                                    int64_t growth_interval, int32_t hysteresis, float min_scale,
                                    float max_scale) {
  const math::ScaleState next = math::update_scale(
      {*scale, *growth_tracker, *hysteresis_tracker}, *found_inf, growth_factor, backoff_factor,
      growth_interval, hysteresis, min_scale, max_scale);
  *scale = next.scale;
  *growth_tracker = next.growth_tracker;
  *hysteresis_tracker = next.hysteresis_tracker;
}

void update_scale_cuda(Tensor scale, Tensor growth_tracker, Tensor hysteresis_tracker,
                       Tensor found_inf, double growth_factor, double backoff_factor,
                       int64_t growth_interval, int64_t hysteresis, double min_scale,
                       double max_scale) {
  // dtype/shape/device checks only: the values live on the device (no sync).
  check_update_scale_args(scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor,
                          backoff_factor, growth_interval, hysteresis, min_scale, max_scale);
  const Device dev = scale.device();
  check_cuda(dev);
  const DeviceGuard guard(dev.index());
  update_scale_kernel<<<1, 1, 0, current_stream(dev)>>>(
      ptr<float>(scale), ptr<int32_t>(growth_tracker), ptr<int32_t>(hysteresis_tracker),
      ptr<const float>(found_inf), growth_factor, backoff_factor, growth_interval,
      static_cast<int32_t>(hysteresis), static_cast<float>(min_scale),
      static_cast<float>(max_scale));
  check_launch("update_scale_kernel");
}

}  // namespace
}  // namespace cuda
}  // namespace amp_engine

STABLE_TORCH_LIBRARY_IMPL(amp_engine, CUDA, m) {
  m.impl("update_scale_", TORCH_BOX(&amp_engine::cuda::update_scale_cuda));
}
