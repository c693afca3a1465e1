// Per-tensor step counters of a multi-tensor op on CUDA, counted on the device (no
// host sync, CUDA-graph capturable): the CUDA twin of cpu_multi_tensor.h
// increment_step / check_step_tensor / skip_step.
//
// for_each_step_batch packs the step tensors' pointers into StepBatch kernel arguments
// (kStepsPerLaunch per launch); an op either launches bump_steps_kernel on each batch
// (ops whose coefficients do not depend on the step) or calls bump_step() from its own
// per-tensor prepare kernel (Adam: bias corrections from the new step).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "dlopt/cuda_scalar.cuh"
#include "dlopt/macros.h"

namespace dlopt {
namespace cuda {

constexpr int kStepsPerLaunch = 384;  // keeps StepBatch + a few scalars under 4 KB

struct StepBatch {
  void* step[kStepsPerLaunch];
  bool is_double[kStepsPerLaunch];
  int32_t first;  // global index of step[0]
  int32_t count;
};

// GradScaler's found_inf: non-zero (NaN included, as on the CPU) skips the whole step.
DLOPT_HD bool skip_step(const ScalarRef& found_inf) { return load_f64(found_inf) != 0.0; }

// Adds one to step k of the batch in device memory and returns the new count
// (float32 steps count in float, like the CPU kernel's `*sp += 1.0f`).
DLOPT_HD double bump_step(const StepBatch& b, int k) {
  if (b.is_double[k]) {
    double* s = static_cast<double*>(b.step[k]);
    *s += 1.0;
    return *s;
  }
  float* s = static_cast<float*>(b.step[k]);
  const float f = *s + 1.0f;
  *s = f;
  return f;
}

// One thread per step tensor; a template so that every .cu including this header
// gets the same (weak) kernel symbol.
template <int = 0>
__global__ void bump_steps_kernel(const __grid_constant__ StepBatch b,
                                  const __grid_constant__ ScalarRef found_inf) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k < b.count && !skip_step(found_inf)) bump_step(b, k);
}

inline void check_step_tensor(const at::Tensor& s, const c10::Device& device, size_t i) {
  TORCH_CHECK(s.numel() == 1 && s.device() == device &&
                  (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
              "dlopt: state_steps[", i, "] must be a one-element float32/float64 tensor on ",
              device);
}

// fn(const StepBatch&) for each batch of kStepsPerLaunch step tensors.
template <class Fn>
void for_each_step_batch(at::TensorList steps, Fn&& fn) {
  const size_t n = steps.size();
  for (size_t first = 0; first < n; first += kStepsPerLaunch) {
    StepBatch b;
    b.first = static_cast<int32_t>(first);
    b.count = static_cast<int32_t>(std::min<size_t>(kStepsPerLaunch, n - first));
    for (int k = 0; k < b.count; ++k) {
      const at::Tensor& s = steps[first + k];
      b.step[k] = s.data_ptr();
      b.is_double[k] = s.scalar_type() == at::kDouble;
    }
    fn(static_cast<const StepBatch&>(b));
  }
}

// steps[i] += 1 for every i unless found_inf is set, on the current stream.
inline void bump_steps(at::TensorList steps, const ScalarRef& found_inf) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for_each_step_batch(steps, [&](const StepBatch& b) {
    bump_steps_kernel<<<(b.count + 127) / 128, 128, 0, stream>>>(b, found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace dlopt
