// Storage-dtype adapters for CPU kernels: load to the arithmetic's type C (fp32; double
// for float64 params), store from it. Plain bit operations on uint16_t (not
// c10::BFloat16 objects) so gcc vectorizes them.
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
  using C = float;
  static inline float load(float x) { return x; }
  static inline float store(float x) { return x; }
};

struct BF16 {
  using T = uint16_t;
  using C = float;
  static inline float load(uint16_t x) { return bf16_bits_to_float(x); }
  static inline uint16_t store(float x) { return bf16_bits_rne(x); }
};

struct F16 {
  using T = uint16_t;
  using C = float;
  static inline float load(uint16_t x) { return c10::detail::fp16_ieee_to_fp32_value(x); }
  static inline uint16_t store(float x) { return c10::detail::fp16_ieee_from_fp32_value(x); }
};

// float64 params and states, with double arithmetic (no master copy, no stochastic
// rounding: pick_storage).
struct F64 {
  using T = double;
  using C = double;
  static inline double load(double x) { return x; }
  static inline double store(double x) { return x; }
};

template <class P, Store STORE>
inline typename P::T store_param(typename P::C x, uint32_t key, uint32_t i) {
  if constexpr (STORE == Store::kStochastic && std::is_same_v<P, BF16>) {
    return bf16_bits_stochastic(x, mix32(i ^ key));  // sr_random(key, i), in 32-bit lanes
  } else {
    return P::store(x);
  }
}

// The value an update starts from: the fp32 master copy, or the param itself.
template <class P, Store STORE, class I>
inline typename P::C load_param(const typename P::T* p, const float* master, I i) {
  if constexpr (STORE == Store::kMaster) {
    return master[i];
  } else {
    return P::load(p[i]);
  }
}

// Writes an updated value back: into the master copy (if any) and into the
// param, rounded as STORE says. `base + i` is the element's index in its tensor (the
// stochastic-rounding counter): loops over a chunk pass the chunk's first index as
// `base` and a 32-bit `i` from there (ChunkLoop), so the vectorized loop keeps that
// counter in 32-bit lanes.
template <class P, Store STORE, class I>
inline void write_param(typename P::T* p, float* master, typename P::C x, uint32_t key, I i,
                        uint32_t base = 0) {
  if constexpr (STORE == Store::kMaster) master[i] = x;
  p[i] = store_param<P, STORE>(x, key, base + static_cast<uint32_t>(i));
}

// Software prefetch. Why: on the CI-like Xeon (a 2-vCPU VM) one core's hardware
// prefetcher does not keep enough lines in flight for a step's several streams. The step
// loops run in blocks of kPrefetchBlock elements; before each block, every stream
// prefetches (read intent) the lines of the block kPrefetchAhead elements further on.
// Counting in elements keeps streams of different element sizes in step. Paired
// kernel-level runs (fp32 SGD, SGD momentum, Adam, Adagrad, Lion; bf16 SR Adam) picked
// 64 / 512 over blocks of 16, 32, 128 and distances of 256 and 1,024, and over the
// scheme before (256 / 1,024 with write intent, only where element sizes differ, which
// had slowed fp32 loops). Blocks of 16 without prefetch made plain SGD clearly slower:
// a short inner loop's overhead shows when the maths is one FMA. Two-stream loops (plain
// SGD) have since moved to a walk over two halves of each chunk (step_chunk in
// cpu_elementwise.h); every other step loop prefetches as here.
// Addresses past a tensor's end are only prefetched, never read: a prefetch does not
// fault.
constexpr int32_t kPrefetchBlock = 64;
constexpr int32_t kPrefetchAhead = 512;

// always_inline (DLOPT_HD) on all of these: gcc's pure/const discovery counts
// __builtin_prefetch as no side effect, so a call to an out-of-line prefetch helper is
// deleted as dead.
template <class T, size_t... LINE>
DLOPT_HD void prefetch_lines_of(T* ptr, int64_t i, std::index_sequence<LINE...>) {
  if (ptr == nullptr) return;
  const char* q = reinterpret_cast<const char*>(ptr + i);
  (__builtin_prefetch(q + 64 * LINE, 0, 3), ...);
}

// Before the block of a step loop that starts at `lo`: every stream (nullptr: unused).
template <class... T>
DLOPT_HD void prefetch_ahead(int32_t lo, T*... streams) {
  (prefetch_lines_of(streams, static_cast<int64_t>(lo) + kPrefetchAhead,
                     std::make_index_sequence<(kPrefetchBlock * sizeof(T) + 63) / 64>()),
   ...);
}

// Reduction loops (the norm, the grad scaling) read one or two streams: there a whole
// block of lines, kStreamAhead elements ahead, measured best.
constexpr int64_t kStreamAhead = 1024;

template <bool WRITE, size_t... LINE>
DLOPT_HD void prefetch_lines(const char* q, std::index_sequence<LINE...>) {
  (__builtin_prefetch(q + 64 * LINE, WRITE ? 1 : 0, 3), ...);
}

template <int32_t BLOCK, class T>
DLOPT_HD void prefetch_block(T* ptr, int64_t lo) {
  const char* q = reinterpret_cast<const char*>(ptr) + static_cast<size_t>(lo + kStreamAhead) * sizeof(T);
  prefetch_lines<!std::is_const_v<T>>(q, std::make_index_sequence<BLOCK * sizeof(T) / 64>());
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
