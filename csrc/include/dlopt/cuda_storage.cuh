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
#include <cuda_runtime_api.h>
#include <cstdint>
#include "dlopt/cuda_launch.h"
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

// The CUDA twin of cpu_multi_tensor.h pick_storage: maps (param dtype, state dtype,
// store mode) to `Pick<PS, S, MASTER>::run(args...)`, PS the param's storage (whose
// store rounds stochastically under kStochastic), S the states'. fp32 params honour a
// master copy and ignore stochastic rounding. The host half has refused every other
// combination (other param dtypes, stochastic rounding of fp16): they return
// cudaErrorInvalidValue without launching.
template <template <class, class, bool> class Pick, class... Args>
cudaError_t pick_storage(DType pt, DType st, StoreMode store, Args&&... args) {
  const bool f32_state = st == DType::kF32;
  switch (pt) {
    case DType::kF32:
      return store == StoreMode::kMaster ? Pick<F32, F32, true>::run(args...)
                                         : Pick<F32, F32, false>::run(args...);
    case DType::kBF16:
      if (store == StoreMode::kMaster) return Pick<BF16, F32, true>::run(args...);
      if (store == StoreMode::kStochastic)
        return f32_state ? Pick<BF16Stochastic, F32, false>::run(args...)
                         : Pick<BF16Stochastic, BF16, false>::run(args...);
      return f32_state ? Pick<BF16, F32, false>::run(args...)
                       : Pick<BF16, BF16, false>::run(args...);
    case DType::kF16:
      if (store == StoreMode::kStochastic) return cudaErrorInvalidValue;
      if (store == StoreMode::kMaster) return Pick<F16, F32, true>::run(args...);
      return f32_state ? Pick<F16, F32, false>::run(args...)
                       : Pick<F16, F16, false>::run(args...);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace dlopt
