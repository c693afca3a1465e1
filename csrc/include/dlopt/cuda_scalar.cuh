// One-element hyperparameter tensors (lr, grad_scale, found_inf, seed) as a
// CUDA kernel sees them. A tensor on the GPU is read by the kernel at run time
// (no host sync; a captured CUDA graph sees later values). A CPU tensor is read
// on the host now (no sync either) and passed by value, as torch's fused
// optimizers allow for lr. An absent optional gives the default value.
#pragma once
#include <ATen/core/Tensor.h>
#include <cuda_fp16.h>
#include <optional>
#include "dlopt/rounding.h"

namespace dlopt {
namespace cuda {

struct ScalarRef {
  const void* ptr = nullptr;  // device memory; nullptr: use value / ivalue
  double value = 0.0;
  int64_t ivalue = 0;
  int32_t dtype = 0;  // c10::ScalarType of *ptr
};

// `integral`: also keep the exact int64 value (seeds), which a double may not hold.
inline ScalarRef scalar_ref(const std::optional<at::Tensor>& t, const c10::Device& device,
                            const char* name, double default_value, bool integral = false) {
  ScalarRef r;
  r.value = default_value;
  r.ivalue = static_cast<int64_t>(default_value);
  if (!t.has_value() || !t->defined()) return r;
  TORCH_CHECK(t->numel() == 1, "dlopt: ", name, " must have one element, got ", t->numel());
  if (t->device().is_cpu()) {
    r.value = t->item<double>();
    if (integral) r.ivalue = t->item<int64_t>();
    return r;
  }
  TORCH_CHECK(t->device() == device, "dlopt: ", name, " is on ", t->device(),
              " but params are on ", device);
  const auto st = t->scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16 ||
                  st == at::kLong || st == at::kInt || st == at::kBool || st == at::kByte,
              "dlopt: unsupported dtype ", st, " for ", name);
  r.ptr = t->const_data_ptr();
  r.dtype = static_cast<int32_t>(st);
  return r;
}

#define DLOPT_ST(x) static_cast<int32_t>(c10::ScalarType::x)

DLOPT_HD double load_f64(const ScalarRef& s) {
  if (s.ptr == nullptr) return s.value;
  switch (s.dtype) {
    case DLOPT_ST(Float): return *static_cast<const float*>(s.ptr);
    case DLOPT_ST(Double): return *static_cast<const double*>(s.ptr);
    case DLOPT_ST(Half):
      return __half2float(__ushort_as_half(*static_cast<const uint16_t*>(s.ptr)));
    case DLOPT_ST(BFloat16): return bf16_bits_to_float(*static_cast<const uint16_t*>(s.ptr));
    case DLOPT_ST(Long): return static_cast<double>(*static_cast<const int64_t*>(s.ptr));
    case DLOPT_ST(Int): return *static_cast<const int32_t*>(s.ptr);
    default: return *static_cast<const uint8_t*>(s.ptr);  // Bool, Byte
  }
}

DLOPT_HD int64_t load_i64(const ScalarRef& s) {
  if (s.ptr == nullptr) return s.ivalue;
  switch (s.dtype) {
    case DLOPT_ST(Long): return *static_cast<const int64_t*>(s.ptr);
    case DLOPT_ST(Int): return *static_cast<const int32_t*>(s.ptr);
    case DLOPT_ST(Bool):
    case DLOPT_ST(Byte): return *static_cast<const uint8_t*>(s.ptr);
    default: return static_cast<int64_t>(load_f64(s));  // truncates, as item<int64_t>()
  }
}

#undef DLOPT_ST

}  // namespace cuda
}  // namespace dlopt
