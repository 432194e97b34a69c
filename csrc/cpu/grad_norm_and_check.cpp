// CPU kernel of amp_engine::grad_norm_and_check: the L2 norm of the unscaled
// grads and the non-finite check in one read-only pass. Contract:
// amp_engine/ops/reference.py.
//
// Numerics: the unscaled value is formed as the unscale op forms it (fp32
// float(g) * inv_scale, fp64 for fp64 grads), so fp32 grads holding scaled
// values near 1e30 are squared after unscaling and do not overflow; squares
// are accumulated in fp64 (exact for fp32 inputs: fp32 * fp32 fits in a
// double's mantissa) in 16 fixed lanes per chunk. Chunk sums land in a
// per-chunk array and are added per tensor in chunk order, so the result does
// not depend on the thread count or on how the data happens to be aligned.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/grad_chunks.h"
#include "cpu/grad_dtypes.h"

namespace amp_engine::cpu {
namespace {

struct ChunkSum {
  double sumsq;
  int64_t bad;
};

// Sum over i < n of sq(i), and of bad(i), with kLanes independent fp64
// accumulators: a fixed association (lane j gets i % kLanes == j) that the
// compiler maps onto vector registers.
constexpr int kLanes = 16;

template <class Elem>
ChunkSum reduce_chunk(int64_t n, const Elem& elem) {
  double acc[kLanes] = {};
  int32_t bad[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) elem(i + j, acc[j], bad[j]);
  }
  for (int j = 0; i + j < n; ++j) elem(i + j, acc[j], bad[j]);
  // pairwise, fixed order
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) {
      acc[j] += acc[j + w];
      bad[j] += bad[j + w];
    }
  }
  return {acc[0], bad[0]};
}

ChunkSum chunk_sum(const float* __restrict p, int64_t n, float inv) {
  return reduce_chunk(n, [&](int64_t i, double& acc, int32_t& bad) {
    const float u = p[i] * inv;
    const double d = u;
    acc += d * d;
    bad += nonfinite(u);
  });
}

ChunkSum chunk_sum(const double* __restrict p, int64_t n, double inv) {
  return reduce_chunk(n, [&](int64_t i, double& acc, int32_t& bad) {
    const double u = p[i] * inv;
    acc += u * u;
    bad += static_cast<int32_t>(nonfinite(u));
  });
}

// fp16/bf16: the norm uses the fp32 unscaled value; the check asks whether it
// would round to inf/NaN in the grad's dtype (|u| at or past the overflow
// threshold, NaN included), exactly what unscale_and_check_ would store.
ChunkSum chunk_sum(const c10::Half* p16, int64_t n, float inv) {
  const uint16_t* __restrict p = reinterpret_cast<const uint16_t*>(p16);
  return reduce_chunk(n, [&](int64_t i, double& acc, int32_t& bad) {
    const float u = half_to_float(p[i]) * inv;
    const double d = u;
    acc += d * d;
    bad += (bits_of(u) & 0x7FFFFFFFu) >= kHalfOverflowBits;
  });
}

ChunkSum chunk_sum(const c10::BFloat16* p16, int64_t n, float inv) {
  const uint16_t* __restrict p = reinterpret_cast<const uint16_t*>(p16);
  return reduce_chunk(n, [&](int64_t i, double& acc, int32_t& bad) {
    const float u = bf16_to_float(p[i]) * inv;
    const double d = u;
    acc += d * d;
    bad += (bits_of(u) & 0x7FFFFFFFu) >= kBf16OverflowBits;
  });
}

// One dtype group: adds each tensor's sum of squares into sumsq[tensor];
// returns whether any element was non-finite.
template <class T, class Inv>
bool norm_group(const GradSpans& g, Inv inv, int64_t* counts, std::vector<double>& chunk_sumsq,
                std::vector<double>& sumsq) {
  std::atomic<bool> any_bad{false};
  chunk_sumsq.assign(static_cast<size_t>(g.chunks), 0.0);
  for_each_chunk(g, [&](const GradSpan& s, int64_t chunk, int64_t off, int64_t len) {
    const ChunkSum r = chunk_sum(static_cast<const T*>(s.data) + off, len, inv);
    chunk_sumsq[chunk] = r.sumsq;
    if (r.bad != 0) {  // rare: atomics off the common path
      any_bad.store(true, std::memory_order_relaxed);
      if (counts != nullptr) __atomic_fetch_add(counts + s.tensor, r.bad, __ATOMIC_RELAXED);
    }
  });
  for (const GradSpan& s : g.spans) {
    const int64_t n_chunks = (s.numel + kChunk - 1) / kChunk;
    double total = 0.0;
    for (int64_t c = 0; c < n_chunks; ++c) total += chunk_sumsq[s.first_chunk + c];
    sumsq[s.tensor] = total;
  }
  return any_bad.load(std::memory_order_relaxed);
}

std::tuple<at::Tensor, at::Tensor> grad_norm_and_check_cpu(
    at::TensorList grads, const at::Tensor& inv_scale, const at::Tensor& found_inf,
    const std::optional<at::Tensor>& counts, bool per_tensor) {
  const c10::Device dev = check_tensor_list(grads, "grads");
  check_scalar_tensor(inv_scale, "inv_scale", c10::kFloat, dev);
  check_scalar_tensor(found_inf, "found_inf", c10::kFloat, dev);
  const bool has_counts = counts.has_value() && counts->defined();
  if (has_counts) check_counts(*counts, grads.size(), dev);

  const float inv = *inv_scale.const_data_ptr<float>();
  int64_t* counts_data = has_counts ? counts->mutable_data_ptr<int64_t>() : nullptr;

  // Non-dense views (rare) are read from contiguous copies (read-only: no copy_back).
  DenseList dense;
  GradGroups groups;
  if (!collect_spans(grads, groups)) {
    dense = make_dense(grads);
    collect_spans(dense.tensors, groups);
  }
  std::vector<double> sumsq(grads.size(), 0.0);
  std::vector<double> chunk_sumsq;
  const bool any_bad =
      norm_group<float>(groups[kF32], inv, counts_data, chunk_sumsq, sumsq) |
      norm_group<c10::Half>(groups[kF16], inv, counts_data, chunk_sumsq, sumsq) |
      norm_group<c10::BFloat16>(groups[kBF16], inv, counts_data, chunk_sumsq, sumsq) |
      norm_group<double>(groups[kF64], static_cast<double>(inv), counts_data, chunk_sumsq, sumsq);
  if (any_bad) *found_inf.mutable_data_ptr<float>() = 1.0f;

  // Outputs on the grads' device (found_inf's options: fp32, CPU).
  at::Tensor total = found_inf.new_empty({});
  at::Tensor per = found_inf.new_empty({per_tensor ? static_cast<int64_t>(grads.size()) : 0});
  double sum = 0.0;  // tensor order, as the reference sums its per-tensor vector
  for (double s : sumsq) sum += s;
  *total.mutable_data_ptr<float>() = static_cast<float>(std::sqrt(sum));
  if (per_tensor) {
    float* out = per.mutable_data_ptr<float>();
    for (size_t i = 0; i < sumsq.size(); ++i) out[i] = static_cast<float>(std::sqrt(sumsq[i]));
  }
  return {total, per};
}

}  // namespace
}  // namespace amp_engine::cpu

TORCH_LIBRARY_IMPL(amp_engine, CPU, m) {
  m.impl("grad_norm_and_check", &amp_engine::cpu::grad_norm_and_check_cpu);
}
