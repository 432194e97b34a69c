// CPU kernel of amp_engine::grad_norm_and_check: the L2 norm of the unscaled
// grads and the non-finite check in one read-only pass, and with max_norm the
// clip coefficient and the step's multiplier from that norm. Contract:
// amp_engine/ops/reference/scaling.py.
//
// Numerics: the unscaled value is formed as the unscale op forms it (fp32
// float(g) * inv_scale, fp64 for fp64 grads), so fp32 grads holding scaled
// values near 1e30 are squared after unscaling and do not overflow; squares
// are accumulated in fp64 (exact for fp32 inputs: fp32 * fp32 fits in a
// double's mantissa) in 16 fixed lanes per chunk. Chunk sums land in a
// per-chunk array and are added per tensor in chunk order, so the result does
// not depend on the thread count or on how the data happens to be aligned.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/grad_chunks.h"
#include "cpu/grad_dtypes.h"
#include "math/clip.h"

#if defined(__x86_64__) && defined(__AVX512F__)
#include <immintrin.h>
#define AMP_ENGINE_AVX512 1
#endif
#if defined(__x86_64__) && defined(__AVX2__)
#include <immintrin.h>
#define AMP_ENGINE_AVX2 1
#endif

namespace amp_engine::cpu {
namespace {

using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

struct ChunkSum {
  double sumsq;
  int64_t bad;
};

// The hot loop only sums squares, into 16 fp64 lanes: element i of a chunk
// goes to lane i % 16, a fixed association, so the rounding is the same on
// every thread split. The lanes are two 8-wide GCC/Clang vectors, which
// compile to AVX2, SSE2 or NEON as the build targets, with AVX-512 intrinsics
// for the widening multiply-add (gcc's autovectorizer handles this mixed
// fp32/fp64 loop only sometimes, and splits the conversion).
//
// Non-finite values cost the hot loop nothing: a non-finite fp32/fp64 u makes
// its square, hence the chunk's sum, inf/NaN (finite squares of one chunk of
// fp32 values cannot overflow fp64); for fp16/bf16, whether any u would round
// to inf/NaN follows from the largest |g| alone, as rounding is monotonic. A
// chunk so flagged (rare: the step will be skipped) is counted exactly by a
// second pass.
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x8 __attribute__((vector_size(64)));

// Unaligned vector load (by reference: returning a vector by value changes
// the ABI between ISA levels, which gcc warns about in portable builds).
template <class V, class T>
inline void load(V& v, const T* p) {
  std::memcpy(&v, p, sizeof v);
}

inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(Half x) { return half_to_float(x.x); }
inline float widen(BFloat16 x) { return bf16_to_float(x.x); }

#if defined(AMP_ENGINE_AVX2)
// Eight grads widened to fp32 in a register.
inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 widen8(const BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 widen8(const Half* p) {
#if defined(AMP_ENGINE_F16C)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  return _mm256_setr_ps(widen(p[0]), widen(p[1]), widen(p[2]), widen(p[3]), widen(p[4]),
                        widen(p[5]), widen(p[6]), widen(p[7]));
#endif
}
#endif

#if defined(AMP_ENGINE_AVX2) && !defined(AMP_ENGINE_AVX512)
// AVX2: the same 16 lanes, additions and final association as the generic struct
// below, held in four registers (GCC 12 spills the generic one's 64-byte vectors to
// the stack on every add16: 2-3x slower).
struct LaneSums {
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(),
                    _mm256_setzero_pd()};  // lanes 0-3, 4-7, 8-11, 12-15

  template <class T>
  void add16(const T* p, float inv) {
    const __m256 v_inv = _mm256_set1_ps(inv);
    const __m256 u_lo = _mm256_mul_ps(widen8(p), v_inv);
    const __m256 u_hi = _mm256_mul_ps(widen8(p + 8), v_inv);
    const __m256d d[4] = {_mm256_cvtps_pd(_mm256_castps256_ps128(u_lo)),
                          _mm256_cvtps_pd(_mm256_extractf128_ps(u_lo, 1)),
                          _mm256_cvtps_pd(_mm256_castps256_ps128(u_hi)),
                          _mm256_cvtps_pd(_mm256_extractf128_ps(u_hi, 1))};
    for (int k = 0; k < 4; ++k) acc[k] = _mm256_add_pd(acc[k], _mm256_mul_pd(d[k], d[k]));
  }
  void add16(const double* p, double inv) {
    const __m256d v_inv = _mm256_set1_pd(inv);
    for (int k = 0; k < 4; ++k) {
      const __m256d u = _mm256_mul_pd(_mm256_loadu_pd(p + 4 * k), v_inv);
      acc[k] = _mm256_add_pd(acc[k], _mm256_mul_pd(u, u));
    }
  }
  // p[0, n), n a multiple of 16 except for a chunk's last call.
  template <class T, class Inv>
  void add(const T* p, int64_t n, Inv inv) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) add16(p + i, inv);
    if (i == n) return;
    alignas(32) double lanes[16];
    for (int k = 0; k < 4; ++k) _mm256_store_pd(lanes + 4 * k, acc[k]);
    for (int j = 0; i + j < n; ++j) {
      const double u = widen(p[i + j]) * inv;  // fp32 product for fp32/16-bit data
      lanes[j] += u * u;
    }
    for (int k = 0; k < 4; ++k) acc[k] = _mm256_load_pd(lanes + 4 * k);
  }
  double sum() const {  // a[j] = lane j + lane j+8, then pairwise: as the generic sum()
    const __m256d a = _mm256_add_pd(_mm256_add_pd(acc[0], acc[2]), _mm256_add_pd(acc[1], acc[3]));
    const __m128d b = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(_mm_add_sd(b, _mm_unpackhi_pd(b, b)));
  }
};
#else
struct LaneSums {
  f64x8 lo = {};  // lanes 0-7
  f64x8 hi = {};  // lanes 8-15

  // Squares of the unscaled p[0, 16) into the 16 lanes (fp32/fp16/bf16 grads).
  template <class T>
  void add16(const T* p, float inv) {
#if defined(AMP_ENGINE_AVX512)
    // Intrinsics: GCC 12 splits __builtin_convertvector(f32x8 -> f64x8) into
    // 128-bit pieces. The maskz forms avoid its spurious -Wmaybe-uninitialized.
    const __m256 v_inv = _mm256_set1_ps(inv);
    const __m512d d_lo = _mm512_maskz_cvtps_pd(0xFF, _mm256_mul_ps(widen8(p), v_inv));
    const __m512d d_hi = _mm512_maskz_cvtps_pd(0xFF, _mm256_mul_ps(widen8(p + 8), v_inv));
    lo = _mm512_fmadd_pd(d_lo, d_lo, lo);
    hi = _mm512_fmadd_pd(d_hi, d_hi, hi);
#else
    float w[16];
    for (int j = 0; j < 16; ++j) w[j] = widen(p[j]);
    f32x8 w_lo, w_hi;
    load(w_lo, w);
    load(w_hi, w + 8);
    const f64x8 d_lo = __builtin_convertvector(w_lo * inv, f64x8);
    const f64x8 d_hi = __builtin_convertvector(w_hi * inv, f64x8);
    lo += d_lo * d_lo;
    hi += d_hi * d_hi;
#endif
  }
  void add16(const double* p, double inv) {
    f64x8 g_lo, g_hi;
    load(g_lo, p);
    load(g_hi, p + 8);
    const f64x8 u_lo = g_lo * inv;
    const f64x8 u_hi = g_hi * inv;
    lo += u_lo * u_lo;
    hi += u_hi * u_hi;
  }
  // p[0, n), n a multiple of 16 except for a chunk's last call.
  template <class T, class Inv>
  void add(const T* p, int64_t n, Inv inv) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) add16(p + i, inv);
    for (int j = 0; i + j < n; ++j) {
      const double u = widen(p[i + j]) * inv;  // fp32 product for fp32/16-bit data
      (j < 8 ? lo[j] : hi[j - 8]) += u * u;
    }
  }
  double sum() const {  // pairwise, fixed order
    double a[8];
    for (int j = 0; j < 8; ++j) a[j] = lo[j] + hi[j];
    for (int w = 4; w > 0; w /= 2) {
      for (int j = 0; j < w; ++j) a[j] += a[j + w];
    }
    return a[0];
  }
};
#endif

// The largest magnitude among fp16/bf16 bit patterns (their order is that of
// the unsigned bits with the sign cleared; inf and NaN come last).
uint16_t max_magnitude(const uint16_t* __restrict p, int64_t n) {
  uint16_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max<uint16_t>(m, p[i] & 0x7FFFu);
  return m;
}

// Exact non-finite counts for a flagged chunk: the same test unscale_and_check_
// applies to the value it stores.
int64_t count_bad(const float* p, int64_t n, float inv) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += math::bad_f32(math::unscaled(p[i], inv));
  return bad;
}

int64_t count_bad(const double* p, int64_t n, double inv) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += math::bad_f64(math::unscaled(p[i], inv));
  return bad;
}

// fp16/bf16: u (fp32) would round to inf/NaN in the grad's dtype.
int64_t count_bad(const Half* p, int64_t n, float inv) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    bad += math::bad_f16(math::unscaled(half_to_float(p[i].x), inv));
  }
  return bad;
}

int64_t count_bad(const BFloat16* p, int64_t n, float inv) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    bad += math::bad_bf16(math::unscaled(bf16_to_float(p[i].x), inv));
  }
  return bad;
}

AMP_ENGINE_ISA_CLONES ChunkSum chunk_sum(const float* p, int64_t n, float inv) {
  LaneSums sums;
  sums.add(p, n, inv);
  const double sumsq = sums.sum();
  return {sumsq, std::isfinite(sumsq) ? 0 : count_bad(p, n, inv)};
}

// fp64: squares of |u| > 1e154 overflow too; the exact count then finds none.
AMP_ENGINE_ISA_CLONES ChunkSum chunk_sum(const double* p, int64_t n, double inv) {
  LaneSums sums;
  sums.add(p, n, inv);
  const double sumsq = sums.sum();
  return {sumsq, std::isfinite(sumsq) ? 0 : count_bad(p, n, inv)};
}

// fp16/bf16: the norm uses the fp32 unscaled value (not rounded to the grad's
// dtype), as the reference does. Flag: the largest |g| times |inv_scale|
// reaches the overflow threshold (or is NaN). In blocks, so that the second
// read of each block (its largest magnitude) hits L1.
constexpr int64_t kBlock = 1024;
static_assert(kBlock % 16 == 0, "blocks keep each element in its lane");

template <class T>
__attribute__((always_inline)) inline ChunkSum chunk_sum_16bit(const T* p, int64_t n, float inv, float (*to_float)(uint16_t),
                         uint32_t overflow_bits) {
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(p);
  LaneSums sums;
  uint16_t largest_bits = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    sums.add(p + b, m, inv);
    largest_bits = std::max(largest_bits, max_magnitude(raw + b, m));
  }
  const float largest = to_float(largest_bits) * std::fabs(inv);
  const bool flagged = (bits_of(largest) & 0x7FFFFFFFu) >= overflow_bits;
  return {sums.sum(), flagged ? count_bad(p, n, inv) : 0};
}

AMP_ENGINE_ISA_CLONES ChunkSum chunk_sum(const Half* p, int64_t n, float inv) {
  return chunk_sum_16bit(p, n, inv, half_to_float, kHalfOverflowBits);
}

AMP_ENGINE_ISA_CLONES ChunkSum chunk_sum(const BFloat16* p, int64_t n, float inv) {
  return chunk_sum_16bit(p, n, inv, bf16_to_float, kBf16OverflowBits);
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

std::tuple<Tensor, Tensor> grad_norm_and_check_cpu(TensorList grads, Tensor inv_scale,
                                                   Tensor found_inf, OptTensor counts,
                                                   bool per_tensor,
                                                   std::optional<double> max_norm,
                                                   OptTensor clip_coef, OptTensor step_scale) {
  const Device dev = check_grad_check_args(grads, inv_scale, found_inf, counts);
  check_clip_args(max_norm, clip_coef, step_scale, dev);
  const bool has_counts = counts.has_value() && counts->defined();

  const float inv = *ptr<const float>(inv_scale);
  int64_t* counts_data = has_counts ? ptr<int64_t>(*counts) : nullptr;

  // Non-dense views (rare) are read from contiguous copies (read-only: no copy_back).
  DenseList dense;
  GradGroups& groups = scratch_groups();
  if (!collect_spans(grads, groups)) {
    dense = make_dense(grads);
    collect_spans(dense.tensors, groups);
  }
  thread_local std::vector<double> sumsq, chunk_sumsq;  // reused: no allocation per step
  sumsq.assign(grads.size(), 0.0);
  const bool any_bad =
      norm_group<float>(groups[kF32], inv, counts_data, chunk_sumsq, sumsq) |
      norm_group<Half>(groups[kF16], inv, counts_data, chunk_sumsq, sumsq) |
      norm_group<BFloat16>(groups[kBF16], inv, counts_data, chunk_sumsq, sumsq) |
      norm_group<double>(groups[kF64], static_cast<double>(inv), counts_data, chunk_sumsq, sumsq);
  if (any_bad) *ptr<float>(found_inf) = 1.0f;

  const std::vector<int64_t> scalar_shape{};
  const std::vector<int64_t> per_shape{per_tensor ? static_cast<int64_t>(grads.size()) : 0};
  Tensor total = torch::stable::new_empty(found_inf, scalar_shape, ScalarType::Float);
  Tensor per = torch::stable::new_empty(found_inf, per_shape, ScalarType::Float);
  double sum = 0.0;  // tensor order, as the reference sums its per-tensor vector
  for (double s : sumsq) sum += s;
  const float norm = static_cast<float>(std::sqrt(sum));
  *ptr<float>(total) = norm;
  if (max_norm.has_value()) {  // the clip, where the norm is (csrc/math/clip.h)
    const float coef = math::clip_coef(norm, *max_norm);
    if (clip_coef.has_value() && clip_coef->defined()) *ptr<float>(*clip_coef) = coef;
    if (step_scale.has_value() && step_scale->defined()) {
      *ptr<float>(*step_scale) = math::step_scale(inv, coef);
    }
  }
  if (per_tensor) {
    float* out = ptr<float>(per);
    for (size_t i = 0; i < sumsq.size(); ++i) out[i] = static_cast<float>(std::sqrt(sumsq[i]));
  }
  return {total, per};
}

}  // namespace
}  // namespace amp_engine::cpu

STABLE_TORCH_LIBRARY_IMPL(amp_engine, CPU, m) {
  m.impl("grad_norm_and_check", TORCH_BOX(&amp_engine::cpu::grad_norm_and_check_cpu));
}
