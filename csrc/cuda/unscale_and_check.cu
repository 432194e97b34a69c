// CUDA kernel of amp_engine::unscale_and_check_: grads *= inv_scale in place,
// found_inf = 1 if any element is non-finite before or after scaling,
// counts[i] += non-finite elements of grads[i]. One multi-tensor-apply launch
// sequence per dtype group; each grad is read and written once.
#include <torch/csrc/stable/library.h>

#include "cuda/grad_check.cuh"

namespace amp_engine {
namespace cuda {
namespace {

template <typename T>
struct UnscaleFunctor {
  const float* inv_scale;  // device scalar: read by the kernel, no host sync
  float* found_inf;
  unsigned long long* counts;  // nullable

  __device__ void operator()(const ChunkRef<1>& chunk) const {
    const float inv = *inv_scale;
    int bad = 0;
    auto op = [&](T& g) { unscale(g, inv, bad); };
    for_each_element</*kWrite=*/true>(static_cast<T*>(chunk.base[0]) + chunk.begin, chunk.size, op);
    report_non_finite(bad, chunk.tensor_index, found_inf, counts);
  }
};

void unscale_and_check_cuda(TensorList grads, Tensor inv_scale, Tensor found_inf,
                            OptTensor counts) {
  const Device dev = check_cuda_grad_check_args(grads, inv_scale, found_inf, counts);
  if (grads.empty()) return;
  const DeviceGuard guard(dev.index());
  const cudaStream_t stream = current_stream(dev);
  DenseList dense = make_dense(grads);
  const LaunchTable<1> table = grad_table(dense.tensors);
  for (const auto& group : group_by_dtype(dense.tensors)) {
    dispatch_grad_dtype(dense.tensors[group[0]].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const UnscaleFunctor<T> functor{ptr<const float>(inv_scale), ptr<float>(found_inf),
                                      counts_ptr(counts)};
      multi_tensor_apply<1>(table, group, functor, stream);
    });
  }
  copy_back(grads, dense);  // non-dense views were unscaled in a contiguous copy
}

}  // namespace
}  // namespace cuda
}  // namespace amp_engine

STABLE_TORCH_LIBRARY_IMPL(amp_engine, CUDA, m) {
  m.impl("unscale_and_check_", TORCH_BOX(&amp_engine::cuda::unscale_and_check_cuda));
}
