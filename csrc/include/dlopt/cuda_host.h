// The host half every CUDA op shares (csrc/cuda/<op>_host.cpp and cuda_host.cpp, compiled
// by g++): all that checks, formats or throws, so the nvcc-compiled launchers never do
// (dlopt/cuda_launch.h says why). One HostCall per op call, e.g.
//   check_elementwise_lists(params, grads, ...);            // dlopt/tensor_lists.h
//   cuda::HostCall call("lion_step", params);                // one CUDA device, made current
//   call.set_optimizer(state_steps, lr, grad_scale, found_inf, sr_seed, use_master);
//   call.align({params, grads, exp_avgs, master_params}, {true, false, true, true});
//   call.finish(cuda::launch_lion_step(call.launch(), ...)); // raise, copy scratch back
// It owns what must outlive the queued kernels: scratch copies and scratch memory, both
// from torch's stream-ordered caching allocator, so releasing them after queueing is safe.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>

#include <exception>
#include <initializer_list>
#include <optional>
#include <vector>

#include "dlopt/cuda_launch.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace cuda {

// The kernels' name of a float32 / float64 / float16 / bfloat16 tensor's dtype.
DType dtype_of(at::ScalarType st);

class HostCall {
 public:
  // `op` names the op in messages; `tensors` (the params, not empty) must share one CUDA
  // device, `name` is their argument's name.
  HostCall(const char* op, at::TensorList tensors, const char* name = "params");
  HostCall(const HostCall&) = delete;
  HostCall& operator=(const HostCall&) = delete;

  // An optimizer step: float32, bfloat16 or float16 params; state_steps (if any) one
  // one-element float32/float64 tensor per param on the device; lr, grad_scale,
  // found_inf and sr_seed as the kernels read them; the store mode.
  void set_optimizer(at::TensorList state_steps, const at::Tensor& lr,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& sr_seed, bool use_master);

  // A one-element hyperparameter tensor on the device or the CPU (default if absent);
  // `integral` also keeps the exact int64 value (seeds).
  ScalarRef scalar(const std::optional<at::Tensor>& t, const char* name, double default_value,
                   bool integral = false) const;

  // One entry per param over lists laid out like lists[0] (AlignedLists): ptr[k] from
  // list k (nullptr where it is empty), the state dtype from lists[2] (float32 if absent).
  void align(std::initializer_list<at::TensorList> lists, std::initializer_list<bool> mutated);

  // For ops that build their entries themselves (Adafactor: row-major stand-ins).
  std::vector<ParamEntry>& entries() { return entries_; }
  ContiguousCopies& contiguous() { return contiguous_; }

  const Launch& launch();
  // Raises the launcher's error (or a failed scratch allocation's), else copies scratch
  // copies back into the caller's tensors.
  void finish(cudaError_t err);

 private:
  static void* alloc(void* self, size_t bytes);  // Scratch::alloc

  at::TensorList tensors_;
  c10::Device device_;
  c10::cuda::CUDAGuard guard_;
  Launch launch_{};
  std::vector<ParamEntry> entries_;
  std::vector<StepRef> steps_;
  std::optional<AlignedLists> aligned_;
  ContiguousCopies contiguous_;
  std::vector<at::Tensor> scratch_;
  std::exception_ptr alloc_error_;
};

}  // namespace cuda
}  // namespace dlopt
