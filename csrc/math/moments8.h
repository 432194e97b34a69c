// Compact Adam moments: the per-element arithmetic of the 8-bit block format and
// of bf16 moments, for host and device code (no torch includes).
//
// The truth is amp_engine/ops/moments8.py (its docstring defines the format);
// these functions match it bit for bit (tests/optim/test_moments8_header.py
// compiles a program against this header and compares all 256 codes and a sweep
// of floats). Build kernels using it without fused multiply-adds: the encoder's
// products must round on their own, as in the reference.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define AMP_ENGINE_M8_HD __host__ __device__
#else
#define AMP_ENGINE_M8_HD
#endif

namespace amp_engine {
namespace m8 {

constexpr int kBlock = 256;               // elements per absmax block (row-major runs)
constexpr int64_t kMinQuantizedNumel = 4096;  // smaller tensors keep fp32 moments
// (exponent bits, mantissa bits) of the magnitude: signed exp_avg, unsigned exp_avg_sq
constexpr int kSignedE = 3, kSignedM = 4;
constexpr int kUnsignedE = 5, kUnsignedM = 3;

AMP_ENGINE_M8_HD inline float from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

AMP_ENGINE_M8_HD inline uint32_t to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

// 2**k as a float, for the small |k| the formats need (exact, no libm).
AMP_ENGINE_M8_HD inline float pow2(int k) { return from_bits(static_cast<uint32_t>(127 + k) << 23); }

// The largest magnitude of a format with m mantissa bits: 2 - 2**-m.
AMP_ENGINE_M8_HD inline float maxval(int m) { return 2.0f - pow2(-m); }

// The block's absmax folded one element at a time: max |x|, NaN once any x is NaN.
AMP_ENGINE_M8_HD inline float absmax_fold(float acc, float x) {
  const float a = x < 0.0f ? -x : x;
  if (acc != acc) return acc;
  return (a != a || a > acc) ? a : acc;
}

// The stored absmax: below 2**-126 (zero or subnormal) the block is flushed to 0.
AMP_ENGINE_M8_HD inline float absmax_flush(float absmax) {
  return absmax < pow2(-126) ? 0.0f : absmax;
}

// The stored absmax of a block x[0, n) from mx, the max over its elements of the
// bits of |x| (ordered like the values, NaNs above inf: an integer max that
// vectorizes). A block holding a NaN takes absmax_fold's NaN (the first one, sign
// cleared), as every backend does. Host code: the CPU kernels' scalar and AVX2 paths.
inline float absmax_from_max_bits(uint32_t mx, const float* x, int64_t n) {
  if (mx > 0x7F800000u) {
    float acc = 0.0f;
    for (int64_t k = 0; k < n; ++k) acc = absmax_fold(acc, x[k]);
    return acc;
  }
  return absmax_flush(from_bits(mx));
}

// The per-block encoding multiplier: maxval / absmax (0 for a flushed block, and
// for a NaN absmax, as the reference's torch.where(absmax > 0, ...)).
AMP_ENGINE_M8_HD inline float encode_scale(float absmax, int m) {
  return absmax > 0.0f ? maxval(m) / absmax : 0.0f;
}

// fp32 t >= 0 (or NaN) -> the nearest code of (e, m), ties to even, saturating.
// Both ranges are computed and one is selected (no branch), so that a loop of
// encodes vectorizes on the CPU and does not diverge on the GPU.
AMP_ENGINE_M8_HD inline uint32_t encode_magnitude(float t, int e, int m) {
  const int bias = (1 << e) - 1;
  const int shift = 23 - m;
  // subnormal range: an fp32 add of the magic number rounds
  const float magic = pow2(24 - bias - m);
  const uint32_t sub = to_bits(t + magic) - to_bits(magic);
  // normal range: rebias the exponent, round half to even on the integer bits
  int32_t normal = static_cast<int32_t>(to_bits(t) & 0x7FFFFFFFu) - ((127 - bias) << 23);
  normal = (normal + ((1 << (shift - 1)) - 1) + ((normal >> shift) & 1)) >> shift;
  const int32_t top = (1 << (e + m)) - 1;
  const uint32_t norm = static_cast<uint32_t>(normal < top ? normal : top);
  // t < 2**(1 - bias) picks the subnormal code; t >= 0, so the compare is on the bits
  // (NaN takes the normal path, which saturates). A bit blend, not a select: GCC
  // would sink the (possibly trapping) fp32 add into a branch and then not
  // vectorize the loop.
  const uint32_t use_sub = 0u - static_cast<uint32_t>((to_bits(t) & 0x7FFFFFFFu) <
                                                      to_bits(pow2(1 - bias)));
  return norm ^ ((sub ^ norm) & use_sub);
}

// x (any float) -> its byte, given the block's encode_scale.
AMP_ENGINE_M8_HD inline uint8_t encode(float x, float scale, bool is_signed) {
  const int e = is_signed ? kSignedE : kUnsignedE;
  const int m = is_signed ? kSignedM : kUnsignedM;
  const float ax = from_bits(to_bits(x) & 0x7FFFFFFFu);  // |x|, NaN's sign dropped too
  const uint32_t code = encode_magnitude(ax * scale, e, m);
  const uint32_t sign = is_signed ? (to_bits(x) >> 31) << 7 : 0u;  // no branch: see above
  return static_cast<uint8_t>(code | sign);
}

// DECODE[code] = fp32(minifloat(code) / maxval): a 256-entry table to precompute.
AMP_ENGINE_M8_HD inline float decode_value(uint32_t code, bool is_signed) {
  const int e = is_signed ? kSignedE : kUnsignedE;
  const int m = is_signed ? kSignedM : kUnsignedM;
  const int bias = (1 << e) - 1;
  const uint32_t mag = is_signed ? (code & 0x7Fu) : code;
  const uint32_t ef = mag >> m, f = mag & ((1u << m) - 1u);
  // exact in double; one rounding to float, as the reference's fp32(fp64 / fp64)
  double v = ef == 0 ? static_cast<double>(f) * pow2(1 - bias - m)
                     : static_cast<double>((1u << m) + f) * pow2(static_cast<int>(ef) - bias - m);
  float r = static_cast<float>(v / static_cast<double>(maxval(m)));
  return (is_signed && (code & 0x80u)) ? -r : r;
}

AMP_ENGINE_M8_HD inline float decode(uint8_t code, float absmax, const float* table) {
  return table[code] * absmax;
}

// decode() without the table: DECODE[code] * absmax from the code's bits, for
// loops where a table lookup per element would not vectorize (the CPU kernel).
// minifloat(code) is exact in fp32 (normal codes: the bits rebiased; subnormal
// ones: an exact int-to-float times a power of two), and its quotient by maxval,
// rounded once, is decode_value's fp64-then-fp32 quotient for every code
// (tests/optim/test_moments8_header.py checks all 256 of both maps).
AMP_ENGINE_M8_HD inline float decode_bits(uint32_t code, float absmax, bool is_signed) {
  const int e = is_signed ? kSignedE : kUnsignedE;
  const int m = is_signed ? kSignedM : kUnsignedM;
  const int bias = (1 << e) - 1;
  const uint32_t mag = is_signed ? (code & 0x7Fu) : code;
  const uint32_t normal = (mag << (23 - m)) + (static_cast<uint32_t>(127 - bias) << 23);
  const float sub_f = static_cast<float>(static_cast<int32_t>(mag & ((1u << m) - 1u))) *
                      pow2(1 - bias - m);
  const uint32_t is_sub = 0u - static_cast<uint32_t>((mag >> m) == 0u);  // a blend, as encode
  const uint32_t mini = normal ^ ((to_bits(sub_f) ^ normal) & is_sub);
  // mini / maxval without a division (the CPU's divider is the step's bottleneck):
  // the product by the reciprocal, corrected once by the exact residual (Markstein;
  // explicit fmaf, which -ffp-contract=off leaves alone). Correctly rounded for
  // every code of both maps (the test checks all 256), not for every float.
  const float x = from_bits(mini), b = maxval(m), y = 1.0f / b;
  const float q0 = x * y;
  const float v = fmaf(fmaf(-q0, b, x), y, q0);
  const uint32_t sign = is_signed ? (code & 0x80u) << 24 : 0u;
  return from_bits(to_bits(v) | sign) * absmax;
}

// bf16 moments: nearest-even store (NaN stays a quiet NaN), exact load.
AMP_ENGINE_M8_HD inline uint16_t bf16_round_nearest(float x) {
  if (x != x) return 0x7FC0;
  const uint32_t u = to_bits(x);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

AMP_ENGINE_M8_HD inline float bf16_to_float(uint16_t b) { return from_bits(static_cast<uint32_t>(b) << 16); }

}  // namespace m8
}  // namespace amp_engine
