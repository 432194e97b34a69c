// The 8-bit block step of adam_step_compact_ in AVX2 + FMA (x86-64 builds whose
// target has both: -march=native on any x86-64 CPU since 2013). Per block: decode
// both moments 8 lanes at a time into L1 buffers, run the Adam update and fold both
// absmax in one pass, then encode 32 lanes at a time.
//
// Every lane performs exactly the scalar operations of csrc/math/moments8.h and
// csrc/math/adam.h, in the same order with the same roundings (an fmadd only where
// the scalar code calls fmaf; -ffp-contract=off elsewhere), so the result is the
// scalar loops' bit for bit, and so the reference's (tests/optim/test_moments8_ops.py
// and the compact fuzz suite compare this kernel with the reference). It exists
// because the step is compute-bound on a CPU: the auto-vectorized loops of
// adam_step_compact.cpp make seven passes over the block's buffers where this makes
// three, and decode the unsigned map with two in-register table permutes.
#pragma once
#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "math/adam.h"
#include "math/moments8.h"

#define AMP_ENGINE_COMPACT_AVX2 1
// GCC leaves the 32-lane encoder out of line otherwise (a call per 32 elements)
#define AMP_ENGINE_AVX2_INLINE inline __attribute__((always_inline))

namespace amp_engine::m8::avx2 {

AMP_ENGINE_AVX2_INLINE __m256i load_codes8(const uint8_t* c) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
}

// m8::decode_bits(code, 1, true) for 8 signed (E3M4) codes, times absmax.
AMP_ENGINE_AVX2_INLINE __m256 decode8_signed(const uint8_t* c, __m256 absmax) {
  constexpr int m = kSignedM, bias = (1 << kSignedE) - 1;
  const __m256i code = load_codes8(c);
  const __m256i mag = _mm256_and_si256(code, _mm256_set1_epi32(0x7F));
  const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(mag, 23 - m),
                                          _mm256_set1_epi32((127 - bias) << 23));
  const __m256 sub_f = _mm256_mul_ps(
      _mm256_cvtepi32_ps(_mm256_and_si256(mag, _mm256_set1_epi32((1 << m) - 1))),
      _mm256_set1_ps(pow2(1 - bias - m)));
  const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(1 << m), mag);
  const __m256 x = _mm256_castsi256_ps(_mm256_blendv_epi8(normal, _mm256_castps_si256(sub_f), is_sub));
  const float bs = maxval(m);
  const __m256 b = _mm256_set1_ps(bs), y = _mm256_set1_ps(1.0f / bs);
  const __m256 q0 = _mm256_mul_ps(x, y);
  const __m256 v = _mm256_fmadd_ps(_mm256_fnmadd_ps(q0, b, x), y, q0);
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(code, _mm256_set1_epi32(0x80)), 24);
  return _mm256_mul_ps(_mm256_or_ps(v, _mm256_castsi256_ps(sign)), absmax);
}

// The unsigned (E5M3) map by its 3 mantissa bits: a normal code's value is
// normal[f] with the code's exponent field added (a power-of-two scaling, exact: every
// value is a normal float), a subnormal code's is sub[f]; both come from
// m8::decode_bits, so the lanes equal it for all 256 codes.
struct UnsignedTables {
  alignas(32) int32_t normal[8];  // bits of decode_bits(8 + f) less one exponent step
  alignas(32) int32_t sub[8];     // bits of decode_bits(f)
  UnsignedTables() {
    static_assert(kUnsignedM == 3, "one 8-lane permute per table needs 3 mantissa bits");
    for (int f = 0; f < 8; ++f) {
      normal[f] = static_cast<int32_t>(to_bits(decode_bits(8 + f, 1.0f, false)) - (1u << 23));
      sub[f] = static_cast<int32_t>(to_bits(decode_bits(f, 1.0f, false)));
    }
  }
};

AMP_ENGINE_AVX2_INLINE __m256 decode8_unsigned(const uint8_t* c, __m256 absmax, const UnsignedTables& tab) {
  const __m256i code = load_codes8(c);  // vpermd reads each lane's low 3 bits: f
  const __m256i n = _mm256_permutevar8x32_epi32(
      _mm256_load_si256(reinterpret_cast<const __m256i*>(tab.normal)), code);
  const __m256i s = _mm256_permutevar8x32_epi32(
      _mm256_load_si256(reinterpret_cast<const __m256i*>(tab.sub)), code);
  const __m256i nb = _mm256_add_epi32(n, _mm256_slli_epi32(_mm256_srli_epi32(code, kUnsignedM), 23));
  const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(1 << kUnsignedM), code);
  return _mm256_mul_ps(_mm256_castsi256_ps(_mm256_blendv_epi8(nb, s, is_sub)), absmax);
}

// m8::encode for 8 values, given the block's encode_scale: each lane's code in its low byte.
template <bool kSigned>
AMP_ENGINE_AVX2_INLINE __m256i encode8(__m256 x, __m256 scale) {
  constexpr int e = kSigned ? kSignedE : kUnsignedE;
  constexpr int m = kSigned ? kSignedM : kUnsignedM;
  constexpr int bias = (1 << e) - 1;
  constexpr int shift = 23 - m;
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256 t = _mm256_mul_ps(_mm256_and_ps(x, _mm256_castsi256_ps(abs_mask)), scale);
  const __m256 magic = _mm256_set1_ps(pow2(24 - bias - m));
  const __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(t, magic)),
                                       _mm256_castps_si256(magic));
  const __m256i tb = _mm256_and_si256(_mm256_castps_si256(t), abs_mask);
  __m256i normal = _mm256_sub_epi32(tb, _mm256_set1_epi32((127 - bias) << 23));
  const __m256i odd = _mm256_and_si256(_mm256_srai_epi32(normal, shift), _mm256_set1_epi32(1));
  normal = _mm256_add_epi32(normal, _mm256_add_epi32(_mm256_set1_epi32((1 << (shift - 1)) - 1), odd));
  const __m256i norm = _mm256_min_epi32(_mm256_srai_epi32(normal, shift),
                                        _mm256_set1_epi32((1 << (e + m)) - 1));
  const __m256i use_sub = _mm256_cmpgt_epi32(
      _mm256_set1_epi32(static_cast<int32_t>(to_bits(pow2(1 - bias)))), tb);
  const __m256i code = _mm256_blendv_epi8(norm, sub, use_sub);
  if (!kSigned) return code;
  return _mm256_or_si256(code, _mm256_slli_epi32(_mm256_srli_epi32(_mm256_castps_si256(x), 31), 7));
}

// 32 fp32 values at x (32-byte aligned) -> 32 codes at c.
template <bool kSigned>
AMP_ENGINE_AVX2_INLINE void encode32(const float* x, __m256 scale, uint8_t* c) {
  const __m256i a = encode8<kSigned>(_mm256_load_ps(x), scale);
  const __m256i b = encode8<kSigned>(_mm256_load_ps(x + 8), scale);
  const __m256i d = encode8<kSigned>(_mm256_load_ps(x + 16), scale);
  const __m256i f = encode8<kSigned>(_mm256_load_ps(x + 24), scale);
  // the packs interleave 128-bit lanes; one dword permute restores the order
  const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(d, f));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

AMP_ENGINE_AVX2_INLINE uint32_t hmax_u32(__m256i v) {
  __m128i x = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  x = _mm_max_epu32(x, _mm_shuffle_epi32(x, 0x4E));
  x = _mm_max_epu32(x, _mm_shuffle_epi32(x, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(x));
}

// math::adam_update (no amsgrad) for 8 lanes; D and kSmall are the scalar call's
// decay and s.lerp_small.
template <math::Decay D, bool kSmall>
AMP_ENGINE_AVX2_INLINE __m256 adam_update8(const math::AdamCoeffs<float>& s, const math::AdamStepTerms<float>& t,
                           __m256 g, __m256 w, __m256& m, __m256& v) {
  __m256 gk = _mm256_mul_ps(g, _mm256_set1_ps(s.grad_mul));
  if (D == math::Decay::kDecoupled) w = _mm256_mul_ps(w, _mm256_set1_ps(s.decay));
  if (D == math::Decay::kL2) gk = _mm256_add_ps(gk, _mm256_mul_ps(_mm256_set1_ps(s.wd), w));
  const __m256 diff = _mm256_sub_ps(gk, m);
  m = kSmall ? _mm256_add_ps(m, _mm256_mul_ps(_mm256_set1_ps(s.w1), diff))
             : _mm256_sub_ps(gk, _mm256_mul_ps(diff, _mm256_set1_ps(s.one_minus_w1)));
  v = _mm256_add_ps(_mm256_mul_ps(v, _mm256_set1_ps(s.beta2)),
                    _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(s.omb2), gk), gk));
  const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), _mm256_set1_ps(t.bc2_sqrt)),
                                     _mm256_set1_ps(s.eps));
  return _mm256_add_ps(w, _mm256_div_ps(_mm256_mul_ps(_mm256_set1_ps(t.neg_step_size), m), denom));
}

// One block (n <= 256 elements) of the step with both moments 8-bit: g the grads
// and w the weights in fp32 (memory or the caller's buffers; w is updated in place),
// mc / vc the codes, *ma / *va the block's absmax (read, then rewritten). Three
// loops over the block (decode; update + absmax; encode): one fused loop holds more
// live vectors than AVX2's 16 registers and runs ~10 % slower.
template <math::Decay D, bool kSmall>
inline void step_block8(const math::AdamCoeffs<float>& s, const math::AdamStepTerms<float>& t,
                        const UnsignedTables& tab, const float* g, float* w, uint8_t* mc,
                        uint8_t* vc, float* ma, float* va, int64_t n) {
  alignas(64) float m_buf[kBlock], v_buf[kBlock];
  const int64_t n8 = n / 8 * 8, n32 = n / 32 * 32;  // vector parts; the rest: scalar functions
  const float am = *ma, av = *va;
  const __m256 amv = _mm256_set1_ps(am), avv = _mm256_set1_ps(av);
  for (int64_t k = 0; k < n8; k += 8) {
    _mm256_store_ps(m_buf + k, decode8_signed(mc + k, amv));
    _mm256_store_ps(v_buf + k, decode8_unsigned(vc + k, avv, tab));
  }
  for (int64_t k = n8; k < n; ++k) {
    m_buf[k] = decode_bits(mc[k], am, true);
    v_buf[k] = decode_bits(vc[k], av, false);
  }

  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i mxm = _mm256_setzero_si256(), mxv = _mm256_setzero_si256();
  for (int64_t k = 0; k < n8; k += 8) {
    __m256 mk = _mm256_load_ps(m_buf + k), vk = _mm256_load_ps(v_buf + k);
    _mm256_storeu_ps(w + k, adam_update8<D, kSmall>(s, t, _mm256_loadu_ps(g + k),
                                                    _mm256_loadu_ps(w + k), mk, vk));
    _mm256_store_ps(m_buf + k, mk);
    _mm256_store_ps(v_buf + k, vk);
    mxm = _mm256_max_epu32(mxm, _mm256_and_si256(_mm256_castps_si256(mk), abs_mask));
    mxv = _mm256_max_epu32(mxv, _mm256_and_si256(_mm256_castps_si256(vk), abs_mask));
  }
  uint32_t xm = hmax_u32(mxm), xv = hmax_u32(mxv);
  float unused = 0.0f;
  for (int64_t k = n8; k < n; ++k) {
    w[k] = math::adam_update(s, D, false, t, g[k], w[k], m_buf[k], v_buf[k], unused);
    xm = std::max(xm, to_bits(m_buf[k]) & 0x7FFFFFFFu);
    xv = std::max(xv, to_bits(v_buf[k]) & 0x7FFFFFFFu);
  }
  const float a_m = absmax_from_max_bits(xm, m_buf, n);
  const float a_v = absmax_from_max_bits(xv, v_buf, n);
  *ma = a_m;
  *va = a_v;

  const float sm = encode_scale(a_m, kSignedM), sv = encode_scale(a_v, kUnsignedM);
  const __m256 smv = _mm256_set1_ps(sm), svv = _mm256_set1_ps(sv);
  for (int64_t k = 0; k < n32; k += 32) {
    encode32<true>(m_buf + k, smv, mc + k);
    encode32<false>(v_buf + k, svv, vc + k);
  }
  for (int64_t k = n32; k < n; ++k) {
    mc[k] = encode(m_buf[k], sm, true);
    vc[k] = encode(v_buf[k], sv, false);
  }
}

}  // namespace amp_engine::m8::avx2
#endif
