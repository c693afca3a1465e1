// Per-tensor step counters of a multi-tensor op on CUDA, counted on the device (no
// host sync, CUDA-graph capturable): the CUDA twin of cpu_multi_tensor.h
// increment_step / skip_step (the host half checks the step tensors).
//
// for_each_step_batch packs the call's step pointers into StepBatch kernel arguments
// (kStepsPerLaunch per launch); an op either launches bump_steps_kernel on each batch
// (ops whose coefficients do not depend on the step) or calls bump_step() from its own
// per-tensor prepare kernel (Adam: bias corrections from the new step).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "dlopt/cuda_launch.h"
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

// fn(const StepBatch&) -> cudaError_t for each batch of kStepsPerLaunch of the call's
// steps; stops at the first error.
template <class Fn>
cudaError_t for_each_step_batch(const Launch& l, Fn&& fn) {
  for (int32_t first = 0; first < l.n; first += kStepsPerLaunch) {
    StepBatch b;
    b.first = first;
    b.count = std::min<int32_t>(kStepsPerLaunch, l.n - first);
    for (int k = 0; k < b.count; ++k) {
      b.step[k] = l.steps[first + k].ptr;
      b.is_double[k] = l.steps[first + k].is_double;
    }
    DLOPT_CUDA_TRY(fn(static_cast<const StepBatch&>(b)));
  }
  return cudaSuccess;
}

// steps[i] += 1 for every i unless found_inf is set, on the call's stream.
inline cudaError_t bump_steps(const Launch& l) {
  return for_each_step_batch(l, [&](const StepBatch& b) {
#ifdef DLOPT_EMULATE  // a host-only build (multi_tensor_apply.cuh emulate_blocks)
    for (int k = 0; k < b.count; ++k)
      if (!skip_step(l.found_inf)) bump_step(b, k);
    return cudaSuccess;
#else
    bump_steps_kernel<<<(b.count + 127) / 128, 128, 0, l.stream>>>(b, l.found_inf);
    return cudaGetLastError();
#endif
  });
}

}  // namespace cuda
}  // namespace dlopt
