// Reading a one-element hyperparameter (cuda_launch.h ScalarRef) in a kernel: from
// device memory when it lives on the GPU, else the value the host read.
#pragma once
#include <cuda_fp16.h>
#include <cstdint>

#include "dlopt/cuda_launch.h"
#include "dlopt/rounding.h"

namespace dlopt {
namespace cuda {

DLOPT_HD double load_f64(const ScalarRef& s) {
  if (s.ptr == nullptr) return s.value;
  switch (s.dtype) {
    case DType::kF32: return *static_cast<const float*>(s.ptr);
    case DType::kF64: return *static_cast<const double*>(s.ptr);
    case DType::kF16:
      return __half2float(__ushort_as_half(*static_cast<const uint16_t*>(s.ptr)));
    case DType::kBF16: return bf16_bits_to_float(*static_cast<const uint16_t*>(s.ptr));
    case DType::kI64: return static_cast<double>(*static_cast<const int64_t*>(s.ptr));
    case DType::kI32: return *static_cast<const int32_t*>(s.ptr);
    default: return *static_cast<const uint8_t*>(s.ptr);  // kU8: bool, uint8
  }
}

DLOPT_HD int64_t load_i64(const ScalarRef& s) {
  if (s.ptr == nullptr) return s.ivalue;
  switch (s.dtype) {
    case DType::kI64: return *static_cast<const int64_t*>(s.ptr);
    case DType::kI32: return *static_cast<const int32_t*>(s.ptr);
    case DType::kU8: return *static_cast<const uint8_t*>(s.ptr);
    default: return static_cast<int64_t>(load_f64(s));  // truncates, as item<int64_t>()
  }
}

}  // namespace cuda
}  // namespace dlopt
