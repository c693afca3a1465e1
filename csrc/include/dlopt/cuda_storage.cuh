// Storage-dtype adapters for CUDA kernels (the device twin of cpu_storage.h):
// load a stored element as fp32, store an fp32 result back. Values are moved
// as raw bits (uint16_t for the 16-bit types) so the code does not depend on
// __half / __nv_bfloat16 operators, which torch builds disable with
// -D__CUDA_NO_HALF_OPERATORS__ and friends.
//
// store(x, blk, index) gets the per-block state of the calling Op and the
// element's index in its tensor; only stochastic rounding uses them (it needs
// blk.sr_key), so the bits match the CPU kernel for the same (seed, tensor,
// element). Master weights need no adapter: the fp32 master is one more F32
// list, and the low-precision param is stored with nearest-even rounding.
#pragma once
#include <cuda_fp16.h>
#include <cstdint>
#include "dlopt/rounding.h"

namespace dlopt {
namespace cuda {

struct F32 {
  using T = float;
  DLOPT_HD static float load(float x) { return x; }
  template <class B>
  DLOPT_HD static float store(float x, const B&, int64_t) { return x; }
};

struct BF16 {
  using T = uint16_t;
  DLOPT_HD static float load(uint16_t x) { return bf16_bits_to_float(x); }
  template <class B>
  DLOPT_HD static uint16_t store(float x, const B&, int64_t) {
    return bf16_bits_rne(x);  // same bit recipe as the CPU kernel, NaN included
  }
};

// bf16 param written with stochastic rounding; the Op's Block must have `sr_key`.
struct BF16Stochastic : BF16 {
  template <class B>
  DLOPT_HD static uint16_t store(float x, const B& blk, int64_t i) {
    return bf16_bits_stochastic(x, sr_random(blk.sr_key, static_cast<uint64_t>(i)));
  }
};

// fp16 via the hardware conversions (round to nearest-even, as the CPU path).
struct F16 {
  using T = uint16_t;
  DLOPT_HD static float load(uint16_t x) {
    return __half2float(__ushort_as_half(x));
  }
  template <class B>
  DLOPT_HD static uint16_t store(float x, const B&, int64_t) {
    return __half_as_ushort(__float2half_rn(x));
  }
};

}  // namespace cuda
}  // namespace dlopt
