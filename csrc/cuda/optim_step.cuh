// What the fused optimizer-step CUDA kernels (adam_step.cu, sgd_step.cu) share:
// IEEE arithmetic nvcc cannot contract, element conversions and param rounding
// (nearest even, or stochastic for bf16), the stochastic-rounding hash, packed
// loads, the device-side step counter and the host-side preparation of the
// tensor lists. The contract is amp_engine/ops/optim_reference.py: the same
// operations in the same order, each correctly rounded, no fused multiply-adds.
#pragma once
#include <ATen/ops/cat.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>
#include <vector>

#include "cpu/optim_common.h"  // argument checks and Entry (host code only)
#include "cuda/multi_tensor_apply.cuh"

namespace amp_engine {
namespace cuda {
namespace optim_step {

// ---------------------------------------------------------------- arithmetic
// The _rn intrinsics are never fused into FMAs (nvcc fuses a * b + c by default).
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

// torch.maximum: NaN from either side wins.
template <typename A>
__device__ __forceinline__ A maximum(A a, A b) {
  return (b > a || b != b) ? b : a;
}

// The accumulation type: fp64 for fp64 params, else fp32.
template <typename P>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename A>
__device__ __forceinline__ A to_acc(float x) { return static_cast<A>(x); }
template <typename A>
__device__ __forceinline__ A to_acc(double x) { return static_cast<A>(x); }
template <typename A>
__device__ __forceinline__ A to_acc(__half x) { return static_cast<A>(__half2float(x)); }
template <typename A>
__device__ __forceinline__ A to_acc(__nv_bfloat16 x) {  // exact: the upper half of an fp32
  return static_cast<A>(__uint_as_float(static_cast<uint32_t>(__bfloat16_as_ushort(x)) << 16));
}

// lowbias32 (optim_reference.mix32).
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

__device__ __forceinline__ uint32_t sr_key(const int64_t* rng_state, int32_t tensor_index) {
  const uint64_t seed = static_cast<uint64_t>(rng_state[0]);
  const uint64_t counter = static_cast<uint64_t>(rng_state[1]);
  uint32_t k = mix32(static_cast<uint32_t>(seed) ^ static_cast<uint32_t>(seed >> 32));
  k = mix32(k ^ static_cast<uint32_t>(counter));
  return mix32(k ^ static_cast<uint32_t>(tensor_index));
}

// w (acc) -> the param's dtype. j: the element's offset in the param's memory.
template <typename P, typename A>
__device__ __forceinline__ P round_param(A w, int64_t j, uint32_t key, bool stochastic);
template <>
__device__ __forceinline__ float round_param<float, float>(float w, int64_t, uint32_t, bool) {
  return w;
}
template <>
__device__ __forceinline__ double round_param<double, double>(double w, int64_t, uint32_t, bool) {
  return w;
}
template <>
__device__ __forceinline__ __half round_param<__half, float>(float w, int64_t, uint32_t, bool) {
  return __float2half_rn(w);
}
template <>
__device__ __forceinline__ __nv_bfloat16 round_param<__nv_bfloat16, float>(float w, int64_t j,
                                                                           uint32_t key, bool sr) {
  // Integer rounding, identical in every backend (NaN -> 0x7FC0 as c10::BFloat16 on CPU).
  const uint32_t u = __float_as_uint(w);
  uint32_t r;
  if (sr) {
    const uint64_t uj = static_cast<uint64_t>(j);
    r = mix32(static_cast<uint32_t>(uj) ^ key ^ mix32(static_cast<uint32_t>(uj >> 32))) >> 16;
  } else {
    r = 0x7FFFu + ((u >> 16) & 1u);
  }
  const uint16_t bits = w != w ? uint16_t(0x7FC0) : static_cast<uint16_t>((u + r) >> 16);
  return __ushort_as_bfloat16(bits);
}

// ---------------------------------------------------------------- packed access
// N elements at p + off as one load/store (N = 1: a plain one). Callers check
// alignment to sizeof(Pack<T, N>) first.
template <int N, typename T>
__device__ __forceinline__ void load_n(const void* base, int64_t off, T (&r)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(static_cast<const T*>(base) + off);
#pragma unroll
  for (int k = 0; k < N; ++k) r[k] = pk.v[k];
}
template <int N, typename T>
__device__ __forceinline__ void store_n(void* base, int64_t off, const T (&r)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = r[k];
  *reinterpret_cast<Pack<T, N>*>(static_cast<T*>(base) + off) = pk;
}

template <typename T, int N>
__host__ __device__ __forceinline__ bool aligned_for(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T, N>)) == 0;
}

// Calls fn.template run<N>(offset) over [0, size) of the chunk: packs of kVec
// when every array is aligned for them (chunks start at multiples of 64k
// elements, so this is the allocation's alignment), single elements otherwise
// and for the tail.
template <int kVec, typename Fn>
__device__ __forceinline__ void for_each_pack(int64_t size, bool vec, const Fn& fn) {
  int64_t done = 0;
  if (vec) {
    const int64_t n_vec = size / kVec;
    for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) fn.template run<kVec>(i * kVec);
    done = n_vec * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < size; i += blockDim.x) fn.template run<1>(i);
}

// ---------------------------------------------------------------- step counters
// steps[i] += 1 (atomically: one tensor may be listed twice, and then counts
// twice as in the reference) and rng counter += 1, in a launch after the update
// so every update read the old values; nothing when found_inf != 0.
struct CountStepFunctor {
  const float* found_inf;  // nullable
  int64_t* rng_state;      // nullptr: leave it
  __device__ void operator()(const ChunkRef<1>& chunk) const {
    if (threadIdx.x != 0 || (found_inf != nullptr && *found_inf != 0.0f)) return;
    atomicAdd(static_cast<float*>(chunk.base[0]), 1.0f);
    if (rng_state != nullptr && chunk.block == 0) rng_state[1] += 1;
  }
};

inline void count_step(at::TensorList steps, const std::optional<at::Tensor>& found_inf,
                       int64_t* rng_state) {
  std::vector<size_t> all(steps.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  const CountStepFunctor functor{found_inf ? found_inf->data_ptr<float>() : nullptr, rng_state};
  multi_tensor_apply<1>({steps}, all, functor);
}

// The step counters' values in one fp32 [n] tensor (one device copy, no sync):
// chunk functors look their tensor's counter up by index.
inline at::Tensor stacked_steps(at::TensorList steps) {
  std::vector<at::Tensor> flat;
  flat.reserve(steps.size());
  for (const auto& s : steps) flat.push_back(s.reshape({1}));
  return at::cat(flat);
}

// ---------------------------------------------------------------- host preparation
// Lists the kernels walk: list k holds, for every param, its k-th tensor
// (param, grad, states..., master), as it is or as a contiguous copy (Entry);
// an absent tensor is replaced by the param (never touched: numel matches).
template <int kDepth>
struct Work {
  std::vector<::amp_engine::optim::Entry> entries;
  std::vector<at::Tensor> lists[kDepth];
  std::vector<std::vector<size_t>> groups;  // by (param dtype, grad dtype)

  void add(std::vector<std::optional<at::Tensor>> ts, std::vector<bool> writable) {
    std::vector<at::Tensor> present;
    std::vector<bool> present_writable;
    for (size_t k = 0; k < ts.size(); ++k) {
      if (ts[k]) present.push_back(*ts[k]), present_writable.push_back(writable[k]);
    }
    entries.push_back(::amp_engine::optim::make_entry(present, present_writable));
    const auto& w = entries.back().work;
    for (size_t k = 0, q = 0; k < kDepth; ++k) lists[k].push_back(ts[k] ? w[q++] : w[0]);
    const size_t i = lists[0].size() - 1;
    for (auto& g : groups) {
      if (lists[0][g[0]].scalar_type() == w[0].scalar_type() &&
          lists[1][g[0]].scalar_type() == w[1].scalar_type()) {
        g.push_back(i);
        return;
      }
    }
    groups.push_back({i});
  }
  std::array<at::TensorList, kDepth> tensor_lists() const {
    std::array<at::TensorList, kDepth> out;
    for (int k = 0; k < kDepth; ++k) out[k] = at::TensorList(lists[k]);
    return out;
  }
  void write_back() {
    for (auto& e : entries) ::amp_engine::optim::write_back(e);
  }
};

// fn(P{}, G{}) for a group's param and grad dtypes.
template <typename Fn>
void dispatch_param_grad(c10::ScalarType p, c10::ScalarType g, Fn&& fn) {
  auto with_grad = [&](auto ptag) {
    switch (g) {
      case c10::kFloat: fn(ptag, float{}); break;
      case c10::kHalf: fn(ptag, __half{}); break;
      case c10::kBFloat16: fn(ptag, __nv_bfloat16{}); break;
      default: fn(ptag, double{});
    }
  };
  switch (p) {
    case c10::kFloat: with_grad(float{}); break;
    case c10::kHalf: with_grad(__half{}); break;
    case c10::kBFloat16: with_grad(__nv_bfloat16{}); break;
    default: with_grad(double{});
  }
}

}  // namespace optim_step
}  // namespace cuda
}  // namespace amp_engine
