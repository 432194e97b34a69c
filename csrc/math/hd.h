// What makes a function in csrc/math/ callable from both backends: the
// host+device marker and bit-exact helpers that compile to the same IEEE
// operations on the CPU and the GPU.
//
// Bitwise equality between the backends rests on the build flags too
// (setup.py): -ffp-contract=off for the C++ compiler and --fmad=false for nvcc,
// so that `a * b + c` is two correctly rounded operations everywhere, as in the
// Python reference (which has no fused multiply-adds); nvcc's default
// -prec-div=true / -prec-sqrt=true keep division and sqrt IEEE-exact.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define AMP_ENGINE_HD __host__ __device__
#else
#define AMP_ENGINE_HD
#endif

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace amp_engine::math {

AMP_ENGINE_HD inline uint32_t bits_of(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

AMP_ENGINE_HD inline float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

AMP_ENGINE_HD inline uint64_t bits_of(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
#endif
}

// 1 if inf or NaN. A bit test rather than std::isfinite: vectorizable and
// immune to fast-math flags.
AMP_ENGINE_HD inline int32_t nonfinite(float f) {
  return (bits_of(f) & 0x7F800000u) == 0x7F800000u;
}
AMP_ENGINE_HD inline int64_t nonfinite(double d) {
  return (bits_of(d) & 0x7FF0000000000000ull) == 0x7FF0000000000000ull;
}

// Correctly rounded square roots on both sides (the _rn intrinsics ignore nvcc flags).
AMP_ENGINE_HD inline float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
AMP_ENGINE_HD inline double sqrt_rn(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// pow as torch.pow computes it on each device (glibc's on the CPU, CUDA's
// libdevice on the GPU: the two may differ in the last bit; the reference runs
// torch.pow on the tensors' device, so each backend matches it on its own).
AMP_ENGINE_HD inline double pow_f64(double x, double y) {
#if defined(__CUDA_ARCH__)
  return ::pow(x, y);
#else
  return std::pow(x, y);
#endif
}

}  // namespace amp_engine::math
