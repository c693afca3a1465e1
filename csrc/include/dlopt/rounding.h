// Bit-level float helpers shared by every backend: a counter-based hash (so
// stochastic rounding draws the same random bits for the same (seed, tensor,
// element) on CPU, CUDA, Triton and the pure-torch reference) and float->bf16
// rounding, to nearest-even or stochastically.
#pragma once
#include <cstring>
#include "dlopt/macros.h"

namespace dlopt {

DLOPT_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

DLOPT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// "lowbias32" integer finalizer (Wellons): cheap, good avalanche, integer-only so
// every backend (including torch int64 ops in the reference) can reproduce it.
DLOPT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Per-tensor key: computed once per tensor, then mixed with the element index.
DLOPT_HD uint32_t sr_tensor_key(uint32_t seed, uint32_t tensor_index) {
  return mix32(seed ^ (tensor_index * 0x9E3779B9U));
}

DLOPT_HD uint32_t sr_random(uint32_t key, uint64_t element) {
  return mix32(static_cast<uint32_t>(element) ^ key);
}

DLOPT_HD uint16_t bf16_bits_rne(float x) {
  uint32_t u = float_bits(x);
  uint32_t rounded = (u + 0x7FFFU + ((u >> 16) & 1U)) >> 16;
  return static_cast<uint16_t>((x != x) ? 0x7FC0U : rounded);
}

// Stochastic rounding to bf16: add 16 random bits below the bf16 mantissa and
// truncate, so E[result] == x (unbiased), which keeps tiny updates from being
// rounded away when params live in bf16 without an fp32 master copy.
DLOPT_HD uint16_t bf16_bits_stochastic(float x, uint32_t random) {
  uint32_t u = float_bits(x);
  uint32_t rounded = (u + (random & 0xFFFFU)) >> 16;
  // inf + noise stays inf (mantissa bits are dropped); NaN must stay a NaN.
  return static_cast<uint16_t>((x != x) ? 0x7FC0U : rounded);
}

DLOPT_HD float bf16_bits_to_float(uint16_t b) {
  return bits_float(static_cast<uint32_t>(b) << 16);
}

}  // namespace dlopt
