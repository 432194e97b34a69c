// The CPU counterpart of multi-tensor apply: the tensors of one dtype group are
// laid end to end as one flat range of elements and split across threads by
// element count, so 10,000 tiny grads and 200 huge ones both balance, with one
// parallel region per group and no allocation per tensor.
//
// Work is cut into fixed chunks of kChunk elements aligned to each tensor's
// start; a thread's range is snapped to chunk boundaries, so every chunk is
// always processed whole by one thread. Per-chunk partial results (the norm's
// sums of squares) are therefore independent of the thread count, and summing
// them in chunk order makes the result deterministic.
#pragma once
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "tensors.h"

namespace amp_engine::cpu {

// 32k elements: big enough that per-chunk overhead vanishes, small enough to
// balance two threads on a ragged list and to fit a chunk's output in L2.
constexpr int64_t kChunk = 32768;
// Below this many elements per thread a parallel region costs more than it saves.
constexpr int64_t kMinElemsPerThread = 32768;

struct GradSpan {
  void* data;           // first element (dense memory, walked flat)
  int64_t numel;        // > 0
  int64_t begin;        // offset of the first element in the group's flat range
  int64_t first_chunk;  // index of its first chunk among the group's chunks
  int64_t tensor;       // index in the op's tensor list (counts, per-tensor norms)
};

struct GradSpans {
  std::vector<GradSpan> spans;
  int64_t total = 0;   // elements
  int64_t chunks = 0;  // chunks over all spans
};

// Slots of GradGroups, one per grad dtype.
enum DtypeSlot { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3, kNumSlots = 4 };
using GradGroups = std::array<GradSpans, kNumSlots>;

inline int dtype_slot(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return kF32;
    case ScalarType::Half: return kF16;
    case ScalarType::BFloat16: return kBF16;
    default: return kF64;  // check_tensor_list admitted only these four
  }
}

// The non-empty tensors of `ts` as flat spans grouped by dtype, in one pass
// over the tensors and without copying any Tensor handle (with 10,000 grads
// these per-tensor costs are what remains of the host time). Returns
// false if some tensor is not dense: the caller densifies with make_dense
// (checks.h) and collects again.
// `groups` is cleared first, keeping its capacity: callers pass a thread_local
// one (scratch_groups), so that a step allocates nothing here.
inline bool collect_spans(const TensorList& ts, GradGroups& groups) {
  for (GradSpans& g : groups) {
    g.spans.clear();
    g.total = 0;
    g.chunks = 0;
  }
  for (size_t i = 0; i < ts.size(); ++i) {
    const Tensor& t = ts[i];
    const int64_t n = t.numel();
    if (n == 0) continue;
    if (!is_dense(t)) return false;
    GradSpans& g = groups[dtype_slot(t.scalar_type())];
    if (g.spans.empty()) g.spans.reserve(ts.size() - i);  // one allocation for a one-dtype list
    g.spans.push_back({t.data_ptr(), n, g.total, g.chunks, static_cast<int64_t>(i)});
    g.total += n;
    g.chunks += (n + kChunk - 1) / kChunk;
  }
  return true;
}

// This thread's reusable GradGroups (an op's spans live only during its call; the
// kernels' worker threads never collect). With thousands of grads, fresh vectors
// cost a large malloc per call, and glibc then consolidates the small chunks the
// stable ABI's tensor handles just freed: measurable host time per step.
inline GradGroups& scratch_groups() {
  thread_local GradGroups groups;
  return groups;
}

// Index of the span holding flat element `pos` (pos < total).
inline size_t span_at(const GradSpans& g, int64_t pos) {
  auto it = std::upper_bound(g.spans.begin(), g.spans.end(), pos,
                             [](int64_t p, const GradSpan& s) { return p < s.begin; });
  return static_cast<size_t>(it - g.spans.begin()) - 1;
}

// `pos` moved down to the start of its chunk.
inline int64_t snap_to_chunk(const GradSpans& g, int64_t pos) {
  if (pos >= g.total) return g.total;
  const GradSpan& s = g.spans[span_at(g, pos)];
  return s.begin + (pos - s.begin) / kChunk * kChunk;
}

// Calls fn(span, chunk_index, offset, length) once for every chunk of every
// span, chunks of one thread in order. fn must be thread-safe across chunks.
template <class Fn>
void for_each_chunk(const GradSpans& g, const Fn& fn) {
  if (g.total == 0) return;
  const int64_t threads = std::max<int64_t>(
      1, std::min<int64_t>(torch::stable::get_num_threads(), g.total / kMinElemsPerThread));
  auto run = [&](int64_t task) {
    const int64_t lo = snap_to_chunk(g, g.total / threads * task + g.total % threads * task / threads);
    const int64_t hi =
        task + 1 == threads
            ? g.total
            : snap_to_chunk(g, g.total / threads * (task + 1) + g.total % threads * (task + 1) / threads);
    if (lo >= hi) return;
    for (size_t si = span_at(g, lo); si < g.spans.size() && g.spans[si].begin < hi; ++si) {
      const GradSpan& s = g.spans[si];
      const int64_t first = std::max<int64_t>(lo - s.begin, 0);  // chunk-aligned
      const int64_t last = std::min<int64_t>(hi - s.begin, s.numel);
      for (int64_t off = first; off < last; off += kChunk) {
        fn(s, s.first_chunk + off / kChunk, off, std::min<int64_t>(kChunk, last - off));
      }
    }
  };
  if (threads == 1) {
    run(0);
    return;
  }
  // One task per thread: torch's OpenMP backend hands each thread one
  // contiguous block of tasks, so this gives each thread one balanced range.
  torch::stable::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) run(task);
  });
}

}  // namespace amp_engine::cpu
