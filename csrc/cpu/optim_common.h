// Shared by the fused optimizer-step CPU kernels (adam_step.cpp, sgd_step.cpp):
// the work split, block loads/stores with rounding, and the stochastic-rounding
// hash (argument checks: optim_checks.h). The contract is amp_engine/ops/optim_reference.py.
//
// Work is cut into fixed-size chunks over the concatenation of every tensor of
// the call and run by one at::parallel_for. Inside a chunk, blocks of kBlock
// elements are converted to the compute type (fp32, fp64 for fp64 params) in
// small stack buffers, updated by a vectorizable loop, and written back: every
// param, grad, master and moment is read and written exactly once per step.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "optim_checks.h"

namespace amp_engine::optim {

constexpr int64_t kBlock = 256;                // elements per stack buffer (L1-resident)
constexpr int64_t kChunk = 64 * kBlock;        // elements per parallel work item

// ---------------------------------------------------------------- layouts
// Same shape and, on every dimension longer than 1, the same stride.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// The tensors of one param (param first) walked as flat arrays: as they are
// when all are dense with the param's layout, else as contiguous copies that
// are written back afterwards (`writable` marks the ones the step changes).
struct Entry {
  std::vector<at::Tensor> work;      // what the kernel walks
  std::vector<at::Tensor> original;  // what the caller passed
  std::vector<bool> writable;
  bool copied = false;
};

inline Entry make_entry(std::vector<at::Tensor> ts, std::vector<bool> writable) {
  Entry e;
  bool walk = true;
  for (const auto& t : ts) {
    walk = walk && t.is_non_overlapping_and_dense() && same_layout(t, ts[0]);
  }
  e.original = ts;
  e.writable = std::move(writable);
  e.copied = !walk;
  if (walk) {
    e.work = std::move(ts);
  } else {
    for (const auto& t : ts) e.work.push_back(t.contiguous());
  }
  return e;
}

inline void write_back(Entry& e) {
  if (!e.copied) return;
  for (size_t k = 0; k < e.work.size(); ++k) {
    if (e.writable[k]) e.original[k].copy_(e.work[k]);
  }
}

// ---------------------------------------------------------------- work split
struct Chunk {
  int32_t tensor;
  int64_t begin, end;
};

inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int64_t b = 0; b < numels[i]; b += kChunk) {
      chunks.push_back({static_cast<int32_t>(i), b, std::min(numels[i], b + kChunk)});
    }
  }
  return chunks;
}

// ---------------------------------------------------------------- hashing
// lowbias32 (C. Wellons): bijective uint32 hash; see optim_reference.mix32.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

inline uint32_t sr_key(const int64_t* rng_state, int64_t tensor_index) {
  const uint64_t seed = static_cast<uint64_t>(rng_state[0]);
  const uint64_t counter = static_cast<uint64_t>(rng_state[1]);
  uint32_t k = mix32(static_cast<uint32_t>(seed) ^ static_cast<uint32_t>(seed >> 32));
  k = mix32(k ^ static_cast<uint32_t>(counter));
  return mix32(k ^ static_cast<uint32_t>(tensor_index));
}

// ---------------------------------------------------------------- conversions
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// dst[k] = A(src[base + k]) for k < n, src of dtype `st`.
template <typename A>
inline void load_block(c10::ScalarType st, const void* src, int64_t base, A* dst, int64_t n) {
  switch (st) {
    case c10::kFloat: {
      const float* s = static_cast<const float*>(src) + base;
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<A>(s[k]);
      break;
    }
    case c10::kDouble: {
      const double* s = static_cast<const double*>(src) + base;
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<A>(s[k]);
      break;
    }
    case c10::kBFloat16: {  // exact: bf16 is the upper half of an fp32
      const uint16_t* s = static_cast<const uint16_t*>(src) + base;
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<A>(bits_to_float(uint32_t(s[k]) << 16));
      break;
    }
    default: {  // kHalf
      const c10::Half* s = static_cast<const c10::Half*>(src) + base;
      int64_t k = 0;
#if defined(__F16C__) && defined(__AVX__)
      for (; k + 8 <= n; k += 8) {
        float tmp[8];
        _mm256_storeu_ps(tmp, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k))));
        for (int j = 0; j < 8; ++j) dst[k + j] = static_cast<A>(tmp[j]);
      }
#endif
      for (; k < n; ++k) dst[k] = static_cast<A>(static_cast<float>(s[k]));
    }
  }
}

// fp32 -> bf16 bits, round to nearest even (NaN -> quiet NaN), as c10::BFloat16.
inline uint16_t bf16_rne(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0) : uint16_t(r);
}

// dst[base + k] = round(src[k]) to dtype `st`. Stochastic rounding (bf16 only)
// uses element offsets base + k and the tensor's key.
template <typename A>
inline void store_block(c10::ScalarType st, void* dst, int64_t base, const A* src, int64_t n,
                        bool stochastic, uint32_t key) {
  switch (st) {
    case c10::kFloat: {
      float* d = static_cast<float*>(dst) + base;
      for (int64_t k = 0; k < n; ++k) d[k] = static_cast<float>(src[k]);
      break;
    }
    case c10::kDouble: {
      double* d = static_cast<double*>(dst) + base;
      for (int64_t k = 0; k < n; ++k) d[k] = static_cast<double>(src[k]);
      break;
    }
    case c10::kBFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst) + base;
      if (stochastic) {
        // blocks never straddle a 2**32 boundary (chunks are multiples of kBlock)
        const uint32_t hi = key ^ mix32(static_cast<uint32_t>(static_cast<uint64_t>(base) >> 32));
        const uint32_t lo0 = static_cast<uint32_t>(base);
        for (int64_t k = 0; k < n; ++k) {
          const float f = static_cast<float>(src[k]);
          const uint32_t r = mix32((lo0 + static_cast<uint32_t>(k)) ^ hi) >> 16;
          const uint16_t v = uint16_t((float_to_bits(f) + r) >> 16);
          d[k] = f != f ? uint16_t(0x7FC0) : v;
        }
      } else {
        for (int64_t k = 0; k < n; ++k) d[k] = bf16_rne(static_cast<float>(src[k]));
      }
      break;
    }
    default: {  // kHalf, round to nearest even
      c10::Half* d = static_cast<c10::Half*>(dst) + base;
      int64_t k = 0;
#if defined(__F16C__) && defined(__AVX__)
      for (; k + 8 <= n; k += 8) {
        float tmp[8];
        for (int j = 0; j < 8; ++j) tmp[j] = static_cast<float>(src[k + j]);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + k),
                         _mm256_cvtps_ph(_mm256_loadu_ps(tmp), _MM_FROUND_TO_NEAREST_INT));
      }
#endif
      for (; k < n; ++k) d[k] = c10::Half(static_cast<float>(src[k]));
    }
  }
}

// d[k] = sqrt(d[k]), correctly rounded. Explicit SIMD: GCC will not vectorize
// std::sqrt without -fno-math-errno (errno), which a pragma cannot switch off.
inline void sqrt_block(float* d, int64_t n) {
  int64_t k = 0;
#if defined(__AVX512F__)
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(d + k, _mm512_sqrt_ps(_mm512_loadu_ps(d + k)));
#elif defined(__AVX__)
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(d + k, _mm256_sqrt_ps(_mm256_loadu_ps(d + k)));
#endif
  for (; k < n; ++k) d[k] = std::sqrt(d[k]);
}

inline void sqrt_block(double* d, int64_t n) {
  int64_t k = 0;
#if defined(__AVX512F__)
  for (; k + 8 <= n; k += 8) _mm512_storeu_pd(d + k, _mm512_sqrt_pd(_mm512_loadu_pd(d + k)));
#elif defined(__AVX__)
  for (; k + 4 <= n; k += 4) _mm256_storeu_pd(d + k, _mm256_sqrt_pd(_mm256_loadu_pd(d + k)));
#endif
  for (; k < n; ++k) d[k] = std::sqrt(d[k]);
}

// The flags that gate a step: true if it must be skipped (found_inf != 0).
inline bool skip_step(const c10::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->data_ptr<float>()[0] != 0.0f;
}

inline double read_lr(const c10::optional<at::Tensor>& lr_tensor, double lr) {
  if (!lr_tensor.has_value()) return lr;
  return lr_tensor->scalar_type() == c10::kDouble ? lr_tensor->data_ptr<double>()[0]
                                                  : double(lr_tensor->data_ptr<float>()[0]);
}

}  // namespace amp_engine::optim
