// CUDA kernel of amp_engine::grad_norm_and_check: read-only L2 norm of the
// unscaled grads (total and per tensor) plus the same non-finite check and
// counts as unscale_and_check_, in one read of the grads.
//
// Reproducible by construction (no float atomics): every chunk writes its sum
// of squares (fp64, as the reference accumulates) into its own workspace slot;
// the last chunk of a tensor to finish (an integer counter decides which) sums
// that tensor's slots in a fixed order, in the same launch; one block then sums
// the tensors and takes the square roots. Launches: the multi-tensor sequence
// (one per ~320 chunks) and one finishing block, whatever the tensor count.
//
// The workspace is cached per (device, stream) and reused: no allocation per
// call beyond the two outputs. Its per-tensor sums and counters are left at
// zero by the kernels themselves, so it needs no clearing between calls (and a
// CUDA graph that captured it replays correctly). It grows, outside capture
// only: a call that would need a larger one during capture raises "warm up
// before capture". A grown-out buffer is kept alive, as a captured graph may
// still use it.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda/grad_check.cuh"
#include "math/clip.h"

namespace amp_engine {
namespace cuda {
namespace {

constexpr int kReduceThreads = 256;

// Views into the workspace bytes.
struct Workspace {
  double* partials;     // one slot per chunk, indexed by ChunkRef::block
  double* sumsq;        // one per tensor; zero outside a call
  unsigned* arrivals;   // chunks of the tensor finished; zero outside a call
};

template <typename T>
struct SumSquaresFunctor {
  const float* inv_scale;
  float* found_inf;
  unsigned long long* counts;  // nullable
  Workspace ws;

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
    report_non_finite(bad, chunk.tensor_index, found_inf, counts);

    const int64_t n_chunks = num_chunks(chunk.numel);
    if (n_chunks == 1) {  // the common small tensor: its sum is this chunk's
      if (threadIdx.x == 0) ws.sumsq[chunk.tensor_index] = sumsq;
      return;
    }
    __shared__ bool last;
    if (threadIdx.x == 0) {
      ws.partials[chunk.block] = sumsq;
      __threadfence();  // the slot is visible before the counter says so
      const unsigned done = atomicAdd(ws.arrivals + chunk.tensor_index, 1u);
      last = done + 1 == static_cast<unsigned>(n_chunks);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // The tensor's chunks are consecutive ordinals; summed in a fixed order.
    const int64_t first = chunk.block - chunk.begin / kChunkSize;
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < n_chunks; i += blockDim.x) acc += __ldcg(ws.partials + first + i);
    acc = block_reduce_sum(acc);
    if (threadIdx.x == 0) {
      ws.sumsq[chunk.tensor_index] = acc;
      ws.arrivals[chunk.tensor_index] = 0u;  // ready for the next call
    }
  }
};

// The clip where the norm is (grad_norm_and_check's max_norm; has_clip false:
// nothing written). Pointers may be null.
struct ClipOut {
  bool has_clip;
  double max_norm;
  const float* inv_scale;
  float* clip_coef;
  float* step_scale;
};

// One block: total = sqrt(sum of all sumsq), per[i] = sqrt(sumsq[i]) (per
// nullable), sumsq left at zero. sqrt in fp64, rounded to fp32, as the reference.
// Then, with max_norm, the clip coefficient and the step multiplier (math/clip.h).
__global__ void __launch_bounds__(kReduceThreads)
    finish_norms(double* sumsq, int64_t n, float* total, float* per, ClipOut clip) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double s = sumsq[i];
    sumsq[i] = 0.0;
    acc += s;
    if (per != nullptr) per[i] = static_cast<float>(sqrt(s));
  }
  acc = block_reduce_sum(acc);
  if (threadIdx.x != 0) return;
  const float norm = static_cast<float>(sqrt(acc));
  *total = norm;
  if (!clip.has_clip) return;
  const float coef = math::clip_coef(norm, clip.max_norm);
  if (clip.clip_coef != nullptr) *clip.clip_coef = coef;
  if (clip.step_scale != nullptr) *clip.step_scale = math::step_scale(*clip.inv_scale, coef);
}

// ---------------------------------------------------------------- workspace cache
struct CachedWorkspace {
  int device;
  cudaStream_t stream;
  Tensor* buffer;  // never freed (see the file comment); nullptr until first use
  int64_t n_chunks, n_tensors;
};

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}
// Leaked on purpose: tensors must not be released by static destructors after
// torch's allocator is gone at exit.
std::vector<CachedWorkspace>& cache() {
  static auto* c = new std::vector<CachedWorkspace>();
  return *c;
}

int64_t workspace_bytes(int64_t n_chunks, int64_t n_tensors) {
  return (n_chunks + n_tensors) * static_cast<int64_t>(sizeof(double)) +
         n_tensors * static_cast<int64_t>(sizeof(unsigned));
}

Workspace get_workspace(const Device& dev, cudaStream_t stream, int64_t n_chunks,
                        int64_t n_tensors) {
  const std::lock_guard<std::mutex> lock(cache_mutex());
  CachedWorkspace* entry = nullptr;
  for (auto& e : cache()) {
    if (e.device == dev.index() && e.stream == stream) entry = &e;
  }
  if (entry == nullptr) {
    cache().push_back({dev.index(), stream, nullptr, 0, 0});
    entry = &cache().back();
  }
  if (entry->buffer == nullptr || entry->n_chunks < n_chunks || entry->n_tensors < n_tensors) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    const cudaError_t err = cudaStreamIsCapturing(stream, &status);
    STD_TORCH_CHECK(err == cudaSuccess, "cudaStreamIsCapturing failed: ", cudaGetErrorString(err));
    STD_TORCH_CHECK(status == cudaStreamCaptureStatusNone,
                    "amp_engine::grad_norm_and_check: warm up before capture: its workspace for ",
                    n_tensors, " tensors in ", n_chunks, " chunks would have to grow while the "
                    "stream is being captured into a CUDA graph (allocating then is unsafe). Run "
                    "the step once eagerly with the same grads before capturing it.");
    // Grown geometrically, so a slowly growing model reallocates rarely.
    const int64_t chunks = std::max(n_chunks, 2 * entry->n_chunks);
    const int64_t tensors = std::max(n_tensors, 2 * entry->n_tensors);
    const std::vector<int64_t> size{workspace_bytes(chunks, tensors)};
    Tensor fresh = torch::stable::empty(size, ScalarType::Byte, Layout::Strided, dev);
    const cudaError_t set = cudaMemsetAsync(fresh.data_ptr(), 0, size[0], stream);
    STD_TORCH_CHECK(set == cudaSuccess, "cudaMemsetAsync failed: ", cudaGetErrorString(set));
    entry->buffer = new Tensor(std::move(fresh));  // the old one stays alive (graphs)
    entry->n_chunks = chunks;
    entry->n_tensors = tensors;
  }
  char* base = static_cast<char*>(entry->buffer->data_ptr());
  double* partials = reinterpret_cast<double*>(base);
  double* sumsq = partials + entry->n_chunks;
  unsigned* arrivals = reinterpret_cast<unsigned*>(sumsq + entry->n_tensors);
  return {partials, sumsq, arrivals};
}

std::tuple<Tensor, Tensor> grad_norm_and_check_cuda(TensorList grads, Tensor inv_scale,
                                                    Tensor found_inf, OptTensor counts,
                                                    bool per_tensor,
                                                    std::optional<double> max_norm,
                                                    OptTensor clip_coef, OptTensor step_scale) {
  const Device dev = check_cuda_grad_check_args(grads, inv_scale, found_inf, counts);
  check_clip_args(max_norm, clip_coef, step_scale, dev);
  auto out_ptr = [](const OptTensor& t) { return t.has_value() && t->defined() ? ptr<float>(*t) : nullptr; };
  const ClipOut clip{max_norm.has_value(), max_norm.value_or(0.0), ptr<const float>(inv_scale),
                     out_ptr(clip_coef), out_ptr(step_scale)};
  const DeviceGuard guard(dev.index());
  const cudaStream_t stream = current_stream(dev);
  const int64_t n = static_cast<int64_t>(grads.size());
  const std::vector<int64_t> scalar_shape{};
  const std::vector<int64_t> per_shape{per_tensor ? n : 0};
  Tensor total = torch::stable::new_empty(found_inf, scalar_shape, ScalarType::Float);
  Tensor per = torch::stable::new_empty(found_inf, per_shape, ScalarType::Float);

  const DenseList dense = make_dense(grads);  // read-only: copies need no copy-back
  const auto groups = group_by_dtype(dense.tensors);
  const LaunchTable<1> table = grad_table(dense.tensors);
  int64_t n_chunks = 0;
  for (const int64_t numel : table.numel) n_chunks += num_chunks(numel);
  const Workspace ws = get_workspace(dev, stream, n_chunks, n);

  int64_t visited = 0;
  for (const auto& group : groups) {
    dispatch_grad_dtype(dense.tensors[group[0]].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const SumSquaresFunctor<T> functor{ptr<const float>(inv_scale), ptr<float>(found_inf),
                                         counts_ptr(counts), ws};
      visited = multi_tensor_apply<1>(table, group, functor, stream, visited);
    });
  }
  STD_TORCH_CHECK(visited == n_chunks, "grad_norm_and_check: visited ", visited,
                  " chunks, expected ", n_chunks);
  finish_norms<<<1, kReduceThreads, 0, stream>>>(ws.sumsq, n, ptr<float>(total),
                                                  per_tensor ? ptr<float>(per) : nullptr, clip);
  check_launch("finish_norms");
  return {total, per};
}

}  // namespace
}  // namespace cuda
}  // namespace amp_engine

STABLE_TORCH_LIBRARY_IMPL(amp_engine, CUDA, m) {
  m.impl("grad_norm_and_check", TORCH_BOX(&amp_engine::cuda::grad_norm_and_check_cuda));
}
