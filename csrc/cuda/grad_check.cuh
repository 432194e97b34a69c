// What unscale_and_check_ and grad_norm_and_check share on CUDA: the exact
// per-element unscale arithmetic and non-finite test (amp_engine/ops/reference.py
// is the contract), the walk over one chunk, the per-block report of
// non-finite elements, the argument checks and the dtype dispatch.
// What unscale_and_check_ and grad_norm_and_check share on CUDA: the element
// rule of csrc/math/unscale.h (the code the CPU kernels run) applied to each
// grad dtype, the walk over one chunk, the per-block report of non-finite
// elements, the argument checks and the dtype dispatch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>

#include "checks.h"
#include "cuda/multi_tensor_apply.cuh"
#include "math/rounding.h"
#include "math/unscale.h"

namespace amp_engine {
namespace cuda {

// g <- g * inv_scale rounded to g's dtype; `bad` += 1 if g was non-finite
// before or is after. Returns the unscaled value in the compute type (fp32, or
// fp64 for fp64 grads), unrounded: the norm is taken of that value.
__device__ __forceinline__ float unscale(float& g, float inv_scale, int& bad) {
  const float u = math::unscaled(g, inv_scale);
  bad += math::bad_f32(u);
  g = u;
  return u;
}
__device__ __forceinline__ float unscale(__half& g, float inv_scale, int& bad) {
  const float u = math::unscaled(__half2float(g), inv_scale);
  bad += math::bad_f16(u);
  g = __float2half_rn(u);  // RNE, overflows to inf like torch's .to(fp16)
  return u;
}
__device__ __forceinline__ float unscale(__nv_bfloat16& g, float inv_scale, int& bad) {
  const float u = math::unscaled(math::bf16_to_float(__bfloat16_as_ushort(g)), inv_scale);
  bad += math::bad_bf16(u);
  g = __ushort_as_bfloat16(math::float_to_bf16(u));
  return u;
}
__device__ __forceinline__ double unscale(double& g, float inv_scale, int& bad) {
  const double u = math::unscaled(g, static_cast<double>(inv_scale));
  bad += math::bad_f64(u);
  g = u;
  return u;
}

// Calls op(T& g) on every element of [p, p + size) with the threads of the
// block; with kWrite the (modified) values are stored back. 16-byte packs when
// p is 16-byte aligned (the common case: chunks start at multiples of 64k
// elements of an allocation), kIlp packs in flight per thread to cover memory
// latency; a scalar loop for the tail and for misaligned views. Each thread
// visits its elements in a fixed order, so reductions built on it are
// reproducible.
template <bool kWrite, typename T, typename Op>
__device__ __forceinline__ void for_each_element(T* p, int64_t size, Op& op) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kIlp = 4;
  using P = Pack<T, kVec>;
  int64_t done = 0;
  if (is_aligned_16(p)) {
    P* pv = reinterpret_cast<P*>(p);
    const int64_t n_vec = size / kVec;
    const int64_t stride = blockDim.x;
    for (int64_t i0 = threadIdx.x; i0 < n_vec; i0 += kIlp * stride) {
      P v[kIlp];
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        if (i0 + u * stride < n_vec) v[u] = pv[i0 + u * stride];
      }
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        if (i0 + u * stride < n_vec) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) op(v[u].v[k]);
          if (kWrite) pv[i0 + u * stride] = v[u];
        }
      }
    }
    done = n_vec * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < size; i += blockDim.x) {
    T g = p[i];
    op(g);
    if (kWrite) p[i] = g;
  }
}

// found_inf = 1 (no atomic: every writer writes the same value; never reset)
// and counts[tensor_index] += this block's non-finite count, one atomic per
// block. All threads of the block must call it.
__device__ __forceinline__ void report_non_finite(int bad, int32_t tensor_index, float* found_inf,
                                                  unsigned long long* counts) {
  const int block_bad = block_reduce_sum(bad);
  if (threadIdx.x == 0 && block_bad > 0) {
    *found_inf = 1.0f;
    if (counts != nullptr) atomicAdd(counts + tensor_index, static_cast<unsigned long long>(block_bad));
  }
}

// The shared checks (checks.h) plus: this kernel runs CUDA tensors only.
inline Device check_cuda_grad_check_args(const TensorList& grads, const Tensor& inv_scale,
                                         const Tensor& found_inf, const OptTensor& counts) {
  const Device dev = check_grad_check_args(grads, inv_scale, found_inf, counts);
  check_cuda(dev);
  return dev;
}

inline unsigned long long* counts_ptr(const OptTensor& counts) {
  if (!counts.has_value() || !counts->defined()) return nullptr;
  // int64 slots, added to as unsigned 64-bit: two's complement makes it the same sum.
  return ptr<unsigned long long>(*counts);
}

// The dense grads of a call as a one-list launch table (row i = grads[i]).
inline LaunchTable<1> grad_table(const TensorList& dense) {
  LaunchTable<1> table;
  for (size_t i = 0; i < dense.size(); ++i) {
    table.add({dense[i].data_ptr()}, dense[i].numel(), static_cast<int32_t>(i));
  }
  return table;
}

// fn(T{}) with T the device type of a grad dtype.
template <typename Fn>
void dispatch_grad_dtype(ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case ScalarType::Float: fn(float{}); break;
    case ScalarType::Half: fn(__half{}); break;
    case ScalarType::BFloat16: fn(__nv_bfloat16{}); break;
    case ScalarType::Double: fn(double{}); break;
    default:
      AMP_CHECK_TYPE(false, "grads has dtype ", name(dtype),
                     "; allowed: float32, float16, bfloat16, float64");
  }
}

}  // namespace cuda
}  // namespace amp_engine
