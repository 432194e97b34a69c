// Shared by the fused optimizer-step CPU kernels (adam_step.cpp, sgd_step.cpp):
// the work split and block loads/stores with rounding. The per-element
// arithmetic is csrc/math/ (shared with CUDA), the argument checks
// csrc/optim_checks.h; the contract is amp_engine/ops/reference/optim.py.
//
// Work is cut into fixed-size chunks over the concatenation of every tensor of
// the call and run by one parallel_for. Inside a chunk, blocks of kBlock
// elements are converted to the compute type (fp32, fp64 for fp64 params) in
// small stack buffers, updated by a vectorizable loop, and written back: every
// param, grad, master and moment is read and written exactly once per step.
#pragma once
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "math/rounding.h"
#include "optim_checks.h"

#if defined(__x86_64__) && defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define AMP_ENGINE_F16C 1
#endif

namespace amp_engine::optim {

constexpr int64_t kBlock = 256;          // elements per stack buffer (L1-resident)
constexpr int64_t kChunk = 64 * kBlock;  // elements per parallel work item

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

// ---------------------------------------------------------------- conversions
using Half = torch::headeronly::Half;

// dst[k] = A(src[base + k]) for k < n, src of dtype `st`.
template <typename A>
inline void load_block(ScalarType st, const void* src, int64_t base, A* dst, int64_t n) {
  switch (st) {
    case ScalarType::Float: {
      const float* s = static_cast<const float*>(src) + base;
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<A>(s[k]);
      break;
    }
    case ScalarType::Double: {
      const double* s = static_cast<const double*>(src) + base;
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<A>(s[k]);
      break;
    }
    case ScalarType::BFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + base;
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<A>(math::bf16_to_float(s[k]));
      break;
    }
    default: {  // Half
      const Half* s = static_cast<const Half*>(src) + base;
      int64_t k = 0;
#if defined(AMP_ENGINE_F16C)
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

// dst[base + k] = round(src[k]) to dtype `st`. Stochastic rounding (bf16 only)
// uses element offsets base + k and the tensor's key.
template <typename A>
inline void store_block(ScalarType st, void* dst, int64_t base, const A* src, int64_t n,
                        bool stochastic, uint32_t key) {
  switch (st) {
    case ScalarType::Float: {
      float* d = static_cast<float*>(dst) + base;
      for (int64_t k = 0; k < n; ++k) d[k] = static_cast<float>(src[k]);
      break;
    }
    case ScalarType::Double: {
      double* d = static_cast<double*>(dst) + base;
      for (int64_t k = 0; k < n; ++k) d[k] = static_cast<double>(src[k]);
      break;
    }
    case ScalarType::BFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst) + base;
      if (stochastic) {
        // blocks never straddle a 2**32 boundary (chunks are multiples of kBlock)
        const uint32_t high_key = math::sr_high_key(key, base);
        for (int64_t k = 0; k < n; ++k) {
          const uint32_t r = math::sr_bits(high_key, base + k);
          d[k] = math::bf16_param_bits(static_cast<float>(src[k]), true, r);
        }
      } else {
        for (int64_t k = 0; k < n; ++k) d[k] = math::bf16_param_bits(static_cast<float>(src[k]), false, 0);
      }
      break;
    }
    default: {  // Half, round to nearest even
      Half* d = static_cast<Half*>(dst) + base;
      int64_t k = 0;
#if defined(AMP_ENGINE_F16C)
      for (; k + 8 <= n; k += 8) {
        float tmp[8];
        for (int j = 0; j < 8; ++j) tmp[j] = static_cast<float>(src[k + j]);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + k),
                         _mm256_cvtps_ph(_mm256_loadu_ps(tmp), _MM_FROUND_TO_NEAREST_INT));
      }
#endif
      for (; k < n; ++k) d[k] = Half(static_cast<float>(src[k]));
    }
  }
}

// The flags that gate a step: true if it must be skipped (found_inf != 0).
inline bool skip_step(const OptTensor& found_inf) {
  return found_inf.has_value() && *ptr<const float>(*found_inf) != 0.0f;
}

inline double read_lr(const OptTensor& lr_tensor, double lr) {
  if (!lr_tensor.has_value()) return lr;
  return lr_tensor->scalar_type() == ScalarType::Double ? *ptr<const double>(*lr_tensor)
                                                        : double(*ptr<const float>(*lr_tensor));
}

inline float read_inv_scale(const OptTensor& inv_scale) {
  return inv_scale.has_value() ? *ptr<const float>(*inv_scale) : 1.0f;
}

}  // namespace amp_engine::optim
