// CUDA kernel of amp_engine::grad_norm_and_check: read-only L2 norm of the
// unscaled grads (total and per tensor) plus the same non-finite check and
// counts as unscale_and_check_, in one read of the grads.
//
// Reproducible by construction (no float atomics): every chunk writes its sum
// of squares (fp64, as the reference accumulates) into its own workspace slot;
// then one block per tensor sums that tensor's slots, and one block sums the
// tensors and takes the square roots. Every sum runs in a fixed order.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include <algorithm>
#include <tuple>

#include "cuda/grad_check.cuh"

namespace amp_engine {
namespace cuda {
namespace {

constexpr int kReduceThreads = 256;

template <typename T>
struct SumSquaresFunctor {
  const float* inv_scale;
  float* found_inf;
  unsigned long long* counts;  // nullable
  double* partials;            // one slot per chunk, indexed by ChunkRef::block

  __device__ void operator()(const ChunkRef<1>& chunk) const {
    const float inv = *inv_scale;
    int bad = 0;
    double sumsq = 0.0;
    auto op = [&](T& g) {
      const double u = static_cast<double>(unscale(g, inv, bad));  // g is a register copy
      sumsq += u * u;
    };
    for_each_element</*kWrite=*/false>(static_cast<T*>(chunk.base[0]) + chunk.begin, chunk.size, op);
    sumsq = block_reduce_sum(sumsq);
    if (threadIdx.x == 0) partials[chunk.block] = sumsq;
    report_non_finite(bad, chunk.tensor_index, found_inf, counts);
  }
};

// Per-tensor chunk ranges of up to kRangeTensors tensors, by value (no copy
// to the device). Tensor first_tensor + b owns partials[first_chunk[b] ..
// first_chunk[b] + num_chunks[b]).
constexpr int kRangeTensors = 240;
struct ChunkRanges {
  int64_t first_chunk[kRangeTensors];
  int32_t num_chunks[kRangeTensors];
  int32_t first_tensor;
};
static_assert(sizeof(ChunkRanges) + 2 * sizeof(void*) <= kMaxKernelParamBytes, "ChunkRanges > 4 KB");

__global__ void __launch_bounds__(kReduceThreads)
    sum_chunks_per_tensor(const ChunkRanges ranges, const double* partials, double* sumsq) {
  const double* p = partials + ranges.first_chunk[blockIdx.x];
  const int n = ranges.num_chunks[blockIdx.x];
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += p[i];
  acc = block_reduce_sum(acc);
  if (threadIdx.x == 0) sumsq[ranges.first_tensor + blockIdx.x] = acc;
}

// One block: total = sqrt(sum of all sumsq), per[i] = sqrt(sumsq[i]) (per nullable).
// sqrt in fp64, then rounded to fp32, as the reference does.
__global__ void __launch_bounds__(kReduceThreads)
    finish_norms(const double* sumsq, int64_t n, float* total, float* per) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double s = sumsq[i];
    acc += s;
    if (per != nullptr) per[i] = static_cast<float>(sqrt(s));
  }
  acc = block_reduce_sum(acc);
  if (threadIdx.x == 0) *total = static_cast<float>(sqrt(acc));
}

std::tuple<at::Tensor, at::Tensor> grad_norm_and_check_cuda(
    at::TensorList grads, const at::Tensor& inv_scale, const at::Tensor& found_inf,
    const std::optional<at::Tensor>& counts, bool per_tensor) {
  const c10::Device dev = check_cuda_grad_check_args(grads, inv_scale, found_inf, counts);
  const c10::cuda::CUDAGuard guard(dev);
  const int64_t n = static_cast<int64_t>(grads.size());
  const auto f32 = found_inf.options().dtype(c10::kFloat);
  at::Tensor total = at::empty({}, f32);
  at::Tensor per = at::empty({per_tensor ? n : 0}, f32);

  const DenseList dense = make_dense(grads);  // read-only: copies need no copy-back
  const auto groups = group_by_dtype(dense.tensors);
  // Chunks are numbered in visiting order (groups in order, tensors in group
  // order), so each tensor's chunks are one contiguous run of partials.
  std::vector<int64_t> first_chunk(n);
  int64_t n_chunks = 0;
  for (const auto& group : groups) {
    for (const size_t i : group) {
      first_chunk[i] = n_chunks;
      n_chunks += num_chunks(dense.tensors[i].numel());
    }
  }
  at::Tensor workspace = at::empty({n_chunks + n}, found_inf.options().dtype(c10::kDouble));
  double* partials = workspace.data_ptr<double>();
  double* sumsq = partials + n_chunks;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const std::array<at::TensorList, 1> lists{at::TensorList(dense.tensors)};
  int64_t visited = 0;
  for (const auto& group : groups) {
    dispatch_grad_dtype(dense.tensors[group[0]].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const SumSquaresFunctor<T> functor{inv_scale.data_ptr<float>(), found_inf.data_ptr<float>(),
                                         counts_ptr(counts), partials};
      visited = multi_tensor_apply<1>(lists, group, functor, visited);
    });
  }
  TORCH_INTERNAL_ASSERT(visited == n_chunks, "grad_norm_and_check: visited ", visited,
                        " chunks, expected ", n_chunks);

  // Every tensor (empty ones too: sum 0) gets its sumsq slot written here.
  ChunkRanges ranges{};
  for (int64_t start = 0; start < n; start += kRangeTensors) {
    const int64_t count = std::min<int64_t>(kRangeTensors, n - start);
    for (int64_t b = 0; b < count; ++b) {
      const int64_t i = start + b;
      ranges.first_chunk[b] = first_chunk[i];
      ranges.num_chunks[b] = static_cast<int32_t>(num_chunks(dense.tensors[i].numel()));
    }
    ranges.first_tensor = static_cast<int32_t>(start);
    sum_chunks_per_tensor<<<static_cast<unsigned>(count), kReduceThreads, 0, stream>>>(
        ranges, partials, sumsq);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finish_norms<<<1, kReduceThreads, 0, stream>>>(sumsq, n, total.data_ptr<float>(),
                                                  per_tensor ? per.data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {total, per};
}

}  // namespace
}  // namespace cuda
}  // namespace amp_engine

TORCH_LIBRARY_IMPL(amp_engine, CUDA, m) {
  m.impl("grad_norm_and_check", &amp_engine::cuda::grad_norm_and_check_cuda);
}
