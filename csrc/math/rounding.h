// Rounding fp32 results to a bf16 param, nearest-even or stochastic, and the
// counter-based hash that draws the stochastic bits. The Python reference
// (amp_engine/ops/reference/optim.py: mix32, the SR key, the rounding) defines
// the bits; every backend calls these functions.
#pragma once
#include "math/hd.h"

namespace amp_engine::math {

// lowbias32 (C. Wellons): a bijective uint32 hash; reference/optim.py mix32.
AMP_ENGINE_HD inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

// A tensor's key for one step, from rng_state = [seed, counter] and its index
// in the op's list.
AMP_ENGINE_HD inline uint32_t sr_key(int64_t seed, int64_t counter, int64_t tensor_index) {
  const uint64_t s = static_cast<uint64_t>(seed);
  uint32_t k = mix32(static_cast<uint32_t>(s) ^ static_cast<uint32_t>(s >> 32));
  k = mix32(k ^ static_cast<uint32_t>(static_cast<uint64_t>(counter)));
  return mix32(k ^ static_cast<uint32_t>(tensor_index));
}

// The 16 random bits of element j (its offset in the param's memory):
// mix32(low32(j) ^ key ^ mix32(high32(j))) >> 16. In two steps so that a loop
// over a block that never crosses a 2**32 boundary computes the first once.
AMP_ENGINE_HD inline uint32_t sr_high_key(uint32_t key, int64_t j) {
  return key ^ mix32(static_cast<uint32_t>(static_cast<uint64_t>(j) >> 32));
}
AMP_ENGINE_HD inline uint32_t sr_bits(uint32_t high_key, int64_t j) {
  return mix32(static_cast<uint32_t>(static_cast<uint64_t>(j)) ^ high_key) >> 16;
}

// fp32 -> bf16 bits for a param: round to nearest even, or stochastically by
// adding 16 random bits below the kept ones (`random` < 2**16) and truncating.
// NaN -> 0x7FC0 (c10::BFloat16's quiet NaN).
AMP_ENGINE_HD inline uint16_t bf16_param_bits(float f, bool stochastic, uint32_t random) {
  const uint32_t u = bits_of(f);
  const uint32_t add = stochastic ? random : 0x7FFFu + ((u >> 16) & 1u);
  return f != f ? uint16_t(0x7FC0) : static_cast<uint16_t>((u + add) >> 16);
}

// bf16 bits -> fp32, exact (bf16 is the upper half of an fp32).
AMP_ENGINE_HD inline float bf16_to_float(uint16_t b) {
  return float_of(static_cast<uint32_t>(b) << 16);
}

// fp32 -> bf16 for an unscaled grad, round to nearest even; NaN -> 0xFFFF like
// torch's vectorized conversion (only NaN-ness is part of the contract).
AMP_ENGINE_HD inline uint16_t float_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0xFFFFu : rounded);
}

}  // namespace amp_engine::math
