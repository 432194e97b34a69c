// CUDA kernel of amp_engine::update_scale_: torch._amp_update_scale_ plus
// hysteresis and [min_scale, max_scale] bounds, and the step's bookkeeping (the
// next inv_scale, the next flag zeroed, the update counters, the overflow ring
// row) in the same launch. One thread applies math::update_scale and
// math::count_update (csrc/math/scale_update.h, what the CPU kernel runs) to
// the device state, so the host never syncs.
#include <torch/csrc/stable/library.h>

#include <cstdint>

#include "checks.h"
#include "cuda/runtime.cuh"
#include "math/scale_update.h"

namespace amp_engine {
namespace cuda {
namespace {

// The bounds arrive as fp64 and are compared in fp32, as torch's clamp of an
// fp32 tensor by a Python float does. One thread does the rule and the step's
// bookkeeping (optional pointers may be null); the ring row is copied by the
// whole block.
constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    update_scale_kernel(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker,
                        const float* found_inf, double growth_factor, double backoff_factor,
                        int64_t growth_interval, int32_t hysteresis, float min_scale,
                        float max_scale, float* inv_scale, float* next_found_inf,
                        int64_t* counters, const int64_t* counts, int64_t* ring,
                        int64_t n_counts, int64_t rows) {
  const float flag = *found_inf;  // every thread reads it before thread 0 zeroes the next
  const int64_t u = counters != nullptr ? counters[0] : 0;
  if (ring != nullptr) {
    int64_t* row = ring + (counters[1] % rows) * (n_counts + 1);
    for (int64_t i = threadIdx.x; i < n_counts; i += blockDim.x) row[1 + i] = counts[i];
    if (threadIdx.x == 0) row[0] = u;
  }
  __syncthreads();  // counters[1] is read above before thread 0 writes it below
  if (threadIdx.x != 0) return;
  const math::ScaleState next = math::update_scale(
      {*scale, *growth_tracker, *hysteresis_tracker}, flag, growth_factor, backoff_factor,
      growth_interval, hysteresis, min_scale, max_scale);
  *scale = next.scale;
  *growth_tracker = next.growth_tracker;
  *hysteresis_tracker = next.hysteresis_tracker;
  if (inv_scale != nullptr) *inv_scale = math::inv_scale_of(next.scale);
  if (next_found_inf != nullptr) *next_found_inf = 0.0f;
  if (counters != nullptr) {
    const math::UpdateCounters out =
        math::count_update({u, counters[1], counters[2]}, flag, next.scale, min_scale);
    counters[0] = out.updates;
    counters[1] = out.overflow_updates;
    counters[2] = out.last_above_floor;
  }
}

template <class T>
T* opt_ptr(const OptTensor& t) {
  return t.has_value() && t->defined() ? ptr<T>(*t) : nullptr;
}

void update_scale_cuda(Tensor scale, Tensor growth_tracker, Tensor hysteresis_tracker,
                       Tensor found_inf, double growth_factor, double backoff_factor,
                       int64_t growth_interval, int64_t hysteresis, double min_scale,
                       double max_scale, OptTensor inv_scale, OptTensor next_found_inf,
                       OptTensor counters, OptTensor counts, OptTensor ring) {
  // dtype/shape/device checks only: the values live on the device (no sync).
  check_update_scale_args(scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor,
                          backoff_factor, growth_interval, hysteresis, min_scale, max_scale);
  const Device dev = scale.device();
  check_update_bookkeeping_args(inv_scale, next_found_inf, counters, counts, ring, dev);
  check_cuda(dev);
  const DeviceGuard guard(dev.index());
  int64_t* ring_p = opt_ptr<int64_t>(ring);
  const int threads = ring_p != nullptr ? kThreads : 1;
  update_scale_kernel<<<1, threads, 0, current_stream(dev)>>>(
      ptr<float>(scale), ptr<int32_t>(growth_tracker), ptr<int32_t>(hysteresis_tracker),
      ptr<const float>(found_inf), growth_factor, backoff_factor, growth_interval,
      static_cast<int32_t>(hysteresis), static_cast<float>(min_scale),
      static_cast<float>(max_scale), opt_ptr<float>(inv_scale), opt_ptr<float>(next_found_inf),
      opt_ptr<int64_t>(counters), opt_ptr<const int64_t>(counts), ring_p,
      ring_p != nullptr ? counts->size(0) : 0, ring_p != nullptr ? ring->size(0) : 1);
  check_launch("update_scale_kernel");
}

}  // namespace
}  // namespace cuda
}  // namespace amp_engine

STABLE_TORCH_LIBRARY_IMPL(amp_engine, CUDA, m) {
  m.impl("update_scale_", TORCH_BOX(&amp_engine::cuda::update_scale_cuda));
}
