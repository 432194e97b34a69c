// Per-element arithmetic of the loss-scaling ops for each grad dtype, written as
// plain branch-free C++ that gcc/clang vectorize for whatever ISA the extension
// is compiled for (no at::vec, whose ISA follows CPU_CAPABILITY macros that an
// extension does not get), plus F16C for fp16 where the build targets it.
//
// fp16/bf16 go through fp32 exactly as torch does: widening is exact, narrowing
// rounds to nearest even (c10 semantics), so unscale_and_check_ is bitwise equal
// to the reference on every non-NaN value. NaNs stay NaN with the payload of
// torch's full-vector conversions (fp16: sign and top payload bits, as F16C;
// bf16: 0xFFFF); torch's own scalar tails write other payloads, so only
// NaN-ness is part of the contract.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "math/rounding.h"
#include "math/unscale.h"

// F16C (x86) converts 8 fp16 values per instruction; elsewhere the portable
// conversions below give the same bits.
#if defined(__x86_64__) && defined(__F16C__)
#include <immintrin.h>
#define AMP_ENGINE_F16C 1
#endif

// A portable x86-64 build (AMP_ENGINE_NATIVE=0: SSE2 only) gets AVX2 and
// AVX-512 clones of the element loops, picked when the library loads, the way
// torch picks its own CPU kernels; native builds compile for the machine.
#if defined(__x86_64__) && !defined(__AVX2__) && defined(__GNUC__) && !defined(__clang__)
#define AMP_ENGINE_ISA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AMP_ENGINE_ISA_CLONES
#endif

namespace amp_engine::cpu {

using math::bf16_to_float;
using math::bits_of;
using math::float_of;
using math::float_to_bf16;
using math::kBf16OverflowBits;
using math::kHalfOverflowBits;
using math::nonfinite;

// fp16 -> fp32, exact (FP16 library / c10 portable path: exponent rebias by a
// power-of-two multiply, subnormals via a magic-number subtraction).
inline float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * float_of(0x7800000u);
  const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized);
  return float_of(sign | magnitude);
}

// fp32 -> fp16, round to nearest even. The FPU's own rounding of the final
// addition does the RNE at the right bit position, subnormals included; values
// at or above 65520 reach inf through the scale_to_inf overflow.
inline uint16_t float_to_half(float f) {
  const float scale_to_inf = float_of(239u << 23);   // 2^112
  const float scale_to_zero = float_of(17u << 23);   // 2^-110
  const uint32_t w = bits_of(f);
  const float abs_f = float_of(w & 0x7FFFFFFFu);
  float base = (abs_f * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_of(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  // NaN: quiet, keep the top 9 payload bits (what vcvtps2ph and torch write).
  const uint32_t nan = 0x7E00u | ((w >> 13) & 0x01FFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? nan : nonsign));
}

// fp16 conversions of a block, with F16C when the build targets it (the
// portable bit arithmetic costs ~2 cycles per element, which would make fp16
// compute-bound; vcvtph2ps/vcvtps2ph give the same bits, NaN payloads included).
inline void widen_half(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(AMP_ENGINE_F16C)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

// p[i] = fp16(float(p[i]) * inv) in place; returns how many results are inf/NaN.
inline int64_t scale_half(uint16_t* p, int64_t n, float inv) {
  int64_t i = 0;
  int64_t bad = 0;
#if defined(AMP_ENGINE_F16C)
  const __m256 v_inv = _mm256_set1_ps(inv);
  const __m128i exp_mask = _mm_set1_epi16(0x7C00);
  while (i + 8 <= n) {
    // int16 count lanes, emptied every 4096 vectors so they cannot overflow
    __m128i bad_lanes = _mm_setzero_si128();
    const int64_t stop = std::min<int64_t>(n - 7, i + 8 * 4096);
    for (; i < stop; i += 8) {
      __m128i* at = reinterpret_cast<__m128i*>(p + i);
      const __m256 u = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(at)), v_inv);
      const __m128i r = _mm256_cvtps_ph(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(at, r);
      bad_lanes = _mm_sub_epi16(bad_lanes, _mm_cmpeq_epi16(_mm_and_si128(r, exp_mask), exp_mask));
    }
    alignas(16) int16_t lanes[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(lanes), bad_lanes);
    for (int16_t c : lanes) bad += c;
  }
#endif
  for (; i < n; ++i) {
    const float u = math::unscaled(half_to_float(p[i]), inv);
    p[i] = float_to_half(u);
    bad += math::bad_f16(u);
  }
  return bad;
}

}  // namespace amp_engine::cpu
