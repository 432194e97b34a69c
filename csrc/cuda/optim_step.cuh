// What the fused optimizer-step CUDA kernels (adam_step.cu, sgd_step.cu) share:
// element conversions and param rounding (nearest even, or stochastic for bf16
// with the hash of csrc/math/rounding.h), packed loads, the step-counter bump
// and the host-side preparation of the launch tables. The per-element update
// is csrc/math/ (the code the CPU tests verify bitwise), compiled with
// --fmad=false (setup.py) so that nvcc fuses nothing the reference does not.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>
#include <vector>

#include "cuda/multi_tensor_apply.cuh"
#include "math/rounding.h"
#include "optim_checks.h"

namespace amp_engine {
namespace cuda {
namespace optim_step {

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
  return static_cast<A>(math::bf16_to_float(__bfloat16_as_ushort(x)));
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
  const uint32_t r = sr ? math::sr_bits(math::sr_high_key(key, j), j) : 0u;
  return __ushort_as_bfloat16(math::bf16_param_bits(w, sr, r));
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
// steps[i] += 1 for every counter of the call and rng counter += 1, one thread
// per counter, in launches after the update (same stream) so that every update
// read the old values; nothing when found_inf != 0. Atomic: one tensor may be
// listed twice, and then counts twice, as in the reference. The table travels
// by value in the kernel arguments (no host-to-device copy, capturable).
constexpr int kMaxCounters = 480;  // 3840 bytes of pointers: within the 4 KB argument limit
struct CounterTable {
  float* steps[kMaxCounters];
};

// static: a kernel defined in a header, one copy per .cu file
static __global__ void bump_steps_kernel(const CounterTable table, int n, const float* found_inf,
                                  int64_t* rng_state) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(table.steps[i], 1.0f);
  if (rng_state != nullptr && i == 0) rng_state[1] += 1;
}

inline void bump_steps(const TensorList& steps, const float* found_inf, int64_t* rng_state,
                       cudaStream_t stream) {
  constexpr int kThreads = 128;
  for (size_t start = 0; start < steps.size(); start += kMaxCounters) {
    CounterTable table{};
    const int n = static_cast<int>(std::min<size_t>(kMaxCounters, steps.size() - start));
    for (int i = 0; i < n; ++i) table.steps[i] = ptr<float>(steps[start + i]);
    bump_steps_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        table, n, found_inf, start == 0 ? rng_state : nullptr);
    check_launch("bump_steps_kernel");
  }
}

// ---------------------------------------------------------------- host preparation
// The launch table of a call: row i holds param i's tensors (param, grad,
// states..., master) as they are or as contiguous copies (Entry), an absent one
// replaced by the param's address (never touched), and last its step counter.
// Rows are grouped by (param dtype, grad dtype): one launch sequence per group.
template <int kDepth>
struct Work {
  std::vector<::amp_engine::optim::Entry> entries;
  LaunchTable<kDepth> table;
  std::vector<ScalarType> p_types, g_types;
  std::vector<std::vector<size_t>> groups;

  // ts: the kDepth - 1 tensors of one param (nullopt: absent), then its step.
  void add(std::vector<OptTensor> ts, std::vector<bool> writable, const Tensor& step) {
    TensorList present;
    std::vector<bool> present_writable;
    for (size_t k = 0; k < ts.size(); ++k) {
      if (ts[k]) present.push_back(*ts[k]), present_writable.push_back(writable[k]);
    }
    entries.push_back(::amp_engine::optim::make_entry(present, present_writable));
    const TensorList& w = entries.back().work;
    std::array<void*, kDepth> row{};
    for (size_t k = 0, q = 0; k + 1 < kDepth; ++k) row[k] = ts[k] ? w[q++].data_ptr() : w[0].data_ptr();
    row[kDepth - 1] = step.data_ptr();
    const size_t i = table.numel.size();
    table.add(row, w[0].numel(), static_cast<int32_t>(i));
    const ScalarType pt = w[0].scalar_type();
    const ScalarType gt = w[1].scalar_type();
    p_types.push_back(pt);
    g_types.push_back(gt);
    for (auto& g : groups) {
      if (p_types[g[0]] == pt && g_types[g[0]] == gt) {
        g.push_back(i);
        return;
      }
    }
    groups.push_back({i});
  }
  void write_back() {
    for (auto& e : entries) ::amp_engine::optim::write_back(e);
  }
};

// fn(P{}, G{}) for a group's param and grad dtypes.
template <typename Fn>
void dispatch_param_grad(ScalarType p, ScalarType g, Fn&& fn) {
  auto with_grad = [&](auto ptag) {
    switch (g) {
      case ScalarType::Float: fn(ptag, float{}); break;
      case ScalarType::Half: fn(ptag, __half{}); break;
      case ScalarType::BFloat16: fn(ptag, __nv_bfloat16{}); break;
      default: fn(ptag, double{});
    }
  };
  switch (p) {
    case ScalarType::Float: with_grad(float{}); break;
    case ScalarType::Half: with_grad(__half{}); break;
    case ScalarType::BFloat16: with_grad(__nv_bfloat16{}); break;
    default: with_grad(double{});
  }
}

// Device pointers of the optional scalar arguments (nullptr when absent).
template <typename T>
inline const T* opt_ptr(const OptTensor& t) {
  return t.has_value() ? ptr<const T>(*t) : nullptr;
}

}  // namespace optim_step
}  // namespace cuda
}  // namespace amp_engine
