// Chunked multi-tensor apply: one kernel launch covers many tensors.
//
// Every tensor is cut into chunks of kChunkSize elements; each CUDA block
// handles one chunk. The tensors' addresses and sizes and the block -> (tensor,
// chunk) table travel by value in the kernel arguments (as in apex and torch's
// foreach kernels), so a launch needs no host-to-device copy: nothing syncs and
// the launches can be captured in a CUDA graph. When a table fills, the launch
// is issued and the next one continues where it stopped (a tensor whose chunks
// straddle the boundary is carried over into slot 0).
//
// The tables are sized so that the arguments fit the classic 4 KB kernel
// parameter limit (CUDA 12.1+ allows 32 KB on Volta+, but 4 KB builds and runs
// everywhere; a static_assert guards it). Chunk offsets are int64, so tensors
// of any size are safe.
//
// Usage: call under a DeviceGuard for the tensors' device with its current
// stream (runtime.cuh). A functor is a trivially copyable struct with
//   __device__ void operator()(const ChunkRef<kDepth>& chunk) const;
// that every thread of the block calls (so it may use __syncthreads()).
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "cuda/runtime.cuh"

namespace amp_engine {
namespace cuda {

constexpr int64_t kChunkSize = 65536;  // elements per block, as torch/apex
constexpr int kBlockThreads = 512;     // threads per block of a multi-tensor launch
constexpr int kMaxBlocksPerLaunch = 320;
constexpr int kMaxKernelParamBytes = 4096;

// Tensors per launch for `depth` parallel lists (grads; params+grads; ...):
// fewer when each tensor needs more addresses, to stay within 4 KB.
constexpr int max_tensors_for_depth(int depth) {
  return depth == 1 ? 110 : depth == 2 ? 64 : depth == 3 ? 48 : depth == 4 ? 36
       : depth <= 6 ? 30 : 26;
}

template <int kDepth>
struct TensorListMeta {
  static constexpr int kMaxTensors = max_tensors_for_depth(kDepth);
  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t first_block;                  // ordinal of this launch's block 0 in the whole call
  int32_t tensor_index[kMaxTensors];    // the tensor's position in the caller's list
  int32_t block_to_chunk[kMaxBlocksPerLaunch];
  uint8_t block_to_tensor[kMaxBlocksPerLaunch];  // slot in the arrays above
};

// What a functor sees: one chunk of one tensor (of each of the kDepth lists).
template <int kDepth>
struct ChunkRef {
  void* base[kDepth];    // the tensor's first element, per list (cast to its dtype)
  int64_t begin;         // first element of this chunk
  int64_t size;          // elements in this chunk, 1..kChunkSize
  int64_t numel;         // elements in the whole tensor
  int64_t block;         // ordinal of this chunk among all chunks of the call (a
                         // tensor's chunks are consecutive ordinals)
  int32_t tensor_index;  // position in the caller's list (counts slot, ...)
};

template <int kDepth, typename Functor>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_apply_kernel(const TensorListMeta<kDepth> meta, const Functor functor) {
  const int slot = meta.block_to_tensor[blockIdx.x];
  ChunkRef<kDepth> chunk;
#pragma unroll
  for (int d = 0; d < kDepth; ++d) chunk.base[d] = meta.addresses[d][slot];
  chunk.begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t left = meta.numel[slot] - chunk.begin;
  chunk.size = left < kChunkSize ? left : kChunkSize;
  chunk.numel = meta.numel[slot];
  chunk.block = meta.first_block + blockIdx.x;
  chunk.tensor_index = meta.tensor_index[slot];
  functor(chunk);
}

__host__ __device__ inline int64_t num_chunks(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// What a multi-tensor launch walks, built on the host: per tensor, kDepth
// addresses (one per parallel list: param, grad, states, ..., or a per-tensor
// scalar such as its step counter) and its number of elements (of list 0; the
// element lists all have that many, dense).
template <int kDepth>
struct LaunchTable {
  std::vector<std::array<void*, kDepth>> ptrs;
  std::vector<int64_t> numel;
  std::vector<int32_t> index;  // position in the op's list (counts, SR keys, ...)

  void add(const std::array<void*, kDepth>& p, int64_t n, int32_t i) {
    ptrs.push_back(p);
    numel.push_back(n);
    index.push_back(i);
  }
};

// Runs `functor` over every chunk of the tensors rows[r], r in `rows` (in that
// order; empty tensors are skipped). `first_block` numbers the chunks: the k-th
// chunk visited gets ChunkRef::block == first_block + k. Returns first_block
// plus the number of chunks visited, to chain calls over several dtype groups.
template <int kDepth, typename Functor>
int64_t multi_tensor_apply(const LaunchTable<kDepth>& table, const std::vector<size_t>& rows,
                           const Functor& functor, cudaStream_t stream, int64_t first_block = 0) {
  using Meta = TensorListMeta<kDepth>;
  // Margin for the padding the ABI may put between the two parameters.
  static_assert(sizeof(Meta) + sizeof(Functor) + 16 <= kMaxKernelParamBytes,
                "multi-tensor-apply kernel arguments exceed 4 KB: shrink the functor or tables");
  static_assert(Meta::kMaxTensors <= 256, "block_to_tensor is uint8");

  Meta meta{};
  meta.first_block = first_block;
  int n_tensors = 0;
  int n_blocks = 0;
  auto launch = [&]() {
    // The arguments are copied at launch, so `meta` may be refilled right after.
    multi_tensor_apply_kernel<kDepth, Functor><<<n_blocks, kBlockThreads, 0, stream>>>(meta, functor);
    check_launch("multi_tensor_apply_kernel");
    meta.first_block += n_blocks;
    n_blocks = 0;
  };

  for (const size_t r : rows) {
    const int64_t numel = table.numel[r];
    if (numel == 0) continue;
    int slot = n_tensors++;
    for (int d = 0; d < kDepth; ++d) meta.addresses[d][slot] = table.ptrs[r][d];
    meta.numel[slot] = numel;
    meta.tensor_index[slot] = table.index[r];

    const int64_t chunks = num_chunks(numel);
    AMP_CHECK_VALUE(chunks <= INT32_MAX, "tensor ", table.index[r], " has ", numel,
                    " elements; at most 2^31 chunks of ", kChunkSize, " are supported");
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[n_blocks] = static_cast<uint8_t>(slot);
      meta.block_to_chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = last_chunk && n_tensors == Meta::kMaxTensors;
      if (n_blocks == kMaxBlocksPerLaunch || tensors_full) {
        launch();
        if (last_chunk) {
          n_tensors = 0;  // every tensor in the table is finished
        } else {
          // This tensor continues in the next launch: it becomes slot 0.
          for (int d = 0; d < kDepth; ++d) meta.addresses[d][0] = meta.addresses[d][slot];
          meta.numel[0] = meta.numel[slot];
          meta.tensor_index[0] = meta.tensor_index[slot];
          slot = 0;
          n_tensors = 1;
        }
      }
    }
  }
  if (n_blocks > 0) launch();
  return meta.first_block;
}

// ---- helpers for chunk functors ------------------------------------------

// N elements moved as one 16-byte (or smaller) load/store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
__device__ __forceinline__ bool is_aligned_16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Sum over the block, returned in thread 0 (other threads get partial sums).
// Fixed shuffle tree, so the result does not vary from run to run. All threads
// of the block must call it; blockDim.x must be a multiple of 32. It ends with
// a barrier so it can be called again right away.
template <typename T>
__device__ __forceinline__ T block_reduce_sum(T v) {
  __shared__ T warp_sums[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : T(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  __syncthreads();
  return v;
}

}  // namespace cuda
}  // namespace amp_engine
