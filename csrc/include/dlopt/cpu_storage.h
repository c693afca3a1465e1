// Storage-dtype adapters for CPU kernels: load to fp32, store from fp32. Plain
// bit operations on uint16_t (not c10::BFloat16 objects) so gcc vectorizes them.
#pragma once
#include <c10/util/Half.h>
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include "dlopt/rounding.h"

namespace dlopt {

// How an fp32 result is written into a low-precision param.
enum class Store { kNearest, kMaster, kStochastic };

struct F32 {
  using T = float;
  static inline float load(float x) { return x; }
  static inline float store(float x) { return x; }
};

struct BF16 {
  using T = uint16_t;
  static inline float load(uint16_t x) { return bf16_bits_to_float(x); }
  static inline uint16_t store(float x) { return bf16_bits_rne(x); }
};

struct F16 {
  using T = uint16_t;
  static inline float load(uint16_t x) { return c10::detail::fp16_ieee_to_fp32_value(x); }
  static inline uint16_t store(float x) { return c10::detail::fp16_ieee_from_fp32_value(x); }
};

template <class P, Store STORE>
inline typename P::T store_param(float x, uint32_t key, uint32_t i) {
  if constexpr (STORE == Store::kStochastic && std::is_same_v<P, BF16>) {
    return bf16_bits_stochastic(x, mix32(i ^ key));  // sr_random(key, i), in 32-bit lanes
  } else {
    return P::store(x);
  }
}

// The fp32 value an update starts from: the fp32 master copy, or the param itself.
template <class P, Store STORE, class I>
inline float load_param(const typename P::T* p, const float* master, I i) {
  if constexpr (STORE == Store::kMaster) {
    return master[i];
  } else {
    return P::load(p[i]);
  }
}

// Writes an updated fp32 value back: into the master copy (if any) and into the
// param, rounded as STORE says. `base + i` is the element's index in its tensor (the
// stochastic-rounding counter): loops over a chunk pass the chunk's first index as
// `base` and a 32-bit `i` from there (ChunkLoop), so the vectorized loop keeps that
// counter in 32-bit lanes.
template <class P, Store STORE, class I>
inline void write_param(typename P::T* p, float* master, float x, uint32_t key, I i,
                        uint32_t base = 0) {
  if constexpr (STORE == Store::kMaster) master[i] = x;
  p[i] = store_param<P, STORE>(x, key, base + static_cast<uint32_t>(i));
}

// Software prefetch for the chunk loops. Why: on the CI-like Xeon the hardware
// prefetcher keeps one core's fp32 loops at bandwidth but not loops whose streams move
// at different rates (bf16 params and grads beside fp32 states): there the bf16 SR Adam
// step ran no faster than fp32's although it moves 22 bytes per param against 28. So
// the loops run in blocks of kPrefetchBlock elements, and before each block every
// stream is prefetched kPrefetchAhead elements ahead (write intent where the loop
// stores). Addresses past a tensor's end are only prefetched, never read: a prefetch
// does not fault.
constexpr int32_t kPrefetchBlock = 256;
constexpr int32_t kPrefetchAhead = 1024;

// always_inline on all three: gcc's pure/const discovery counts __builtin_prefetch
// as no side effect, so a call to an out-of-line prefetch helper is deleted as dead.
template <bool WRITE, size_t... LINE>
DLOPT_HD void prefetch_lines(const char* q, std::index_sequence<LINE...>) {
  (__builtin_prefetch(q + 64 * LINE, WRITE ? 1 : 0, 3), ...);
}

template <int32_t BLOCK = kPrefetchBlock, class T>
DLOPT_HD void prefetch_block(T* ptr, int64_t lo) {
  if (ptr == nullptr) return;
  const char* q = reinterpret_cast<const char*>(ptr) + static_cast<size_t>(lo + kPrefetchAhead) * sizeof(T);
  prefetch_lines<!std::is_const_v<T>>(q, std::make_index_sequence<BLOCK * sizeof(T) / 64>());
}

// Prefetches the block after `lo` + kPrefetchAhead of every stream (nullptr: unused),
// in loops whose streams differ in element size. Where all have one size (fp32 params
// and states; bf16 params with bf16 states) the hardware prefetcher keeps up alone.
template <class... T>
DLOPT_HD void prefetch_ahead(int32_t lo, T*... streams) {
  constexpr size_t kSizes[] = {sizeof(T)...};
  constexpr bool kMixed = ((sizeof(T) != kSizes[0]) || ...);
  if constexpr (kMixed) (prefetch_block(streams, lo), ...);
}

// A chunk [begin, end) of one tensor as a 32-bit loop: `offset(ptr)` moves a pointer to
// the chunk's first element, `len` elements follow, `base` is the first one's index.
struct ChunkLoop {
  uint32_t base;
  int32_t len;
  int64_t begin;
  ChunkLoop(int64_t b, int64_t e)  // a chunk has at most kCpuChunk elements
      : base(static_cast<uint32_t>(b)), len(static_cast<int32_t>(e - b)), begin(b) {}
  template <class T>
  T* offset(T* ptr) const {
    return ptr == nullptr ? ptr : ptr + begin;
  }
  // End of the prefetch block that starts at `lo` (see prefetch_ahead).
  int32_t block_end(int32_t lo) const { return std::min(len, lo + kPrefetchBlock); }
};

}  // namespace dlopt
