// The boundary between the two halves of every CUDA op:
//   csrc/cuda/<op>_host.cpp  (g++)   the registered kernel: argument checks, layout
//                                    (AlignedLists), scratch memory, raising errors;
//   csrc/cuda/<op>.cu        (nvcc)  kernels and a launcher that queues them.
// Only the plain data below crosses it: no ATen type, no exception, no message. Why: on
// an H200 (torch 2.11+cu130, nvcc 13.0) a TORCH_CHECK whose message formats a number
// crashed inside std::ostream when nvcc had compiled it (docs/compat.md), so nothing that
// formats or throws is built by nvcc. A launcher gets validated input, queues its
// kernels on `stream` and returns the first CUDA error (cudaSuccess if none); the host
// half raises it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace dlopt {
namespace cuda {

// Element types as the kernels read them (kU8: uint8 and bool).
enum class DType : int32_t { kF32, kF64, kF16, kBF16, kI64, kI32, kU8 };

// A one-element hyperparameter (lr, grad_scale, found_inf, seed, ...). A tensor on the
// GPU is read by the kernels at run time (no host sync; a captured CUDA graph sees later
// values); a CPU tensor was read by the host (no sync either), an absent one is a default.
struct ScalarRef {
  const void* ptr = nullptr;  // device memory; nullptr: use value / ivalue
  double value = 0.0;
  int64_t ivalue = 0;         // the exact int64 value (seeds), which a double may not hold
  DType dtype = DType::kF32;  // of *ptr
};

// How an fp32 result is written into a param.
enum class StoreMode : int32_t { kNearest, kMaster, kStochastic };

constexpr int kMaxLists = 6;

// One param and its per-param tensors, validated and laid out like the param.
struct ParamEntry {
  void* ptr[kMaxLists];  // the op's lists, in the order its launcher names; nullptr: absent
  int64_t numel;
  int64_t rows, cols;    // Adafactor: a factored tensor's last two dims (else 0)
  int32_t index;         // position in the call's lists
  DType param, state;    // dtypes of the param and of its states
  bool new_buffer;       // SGD: the momentum buffer starts as the grad
};

// A state_steps tensor: one float32 or float64 in device memory.
struct StepRef {
  void* ptr;
  bool is_double;
};

// Device memory from torch's caching allocator (stream-ordered, CUDA-graph safe), held
// by the host half until the kernels are queued; nullptr if allocation failed.
struct Scratch {
  void* (*alloc)(void* owner, size_t bytes);
  void* owner;
  void* get(size_t bytes) const { return alloc(owner, bytes); }
};

// One call of an op, as its launcher sees it.
struct Launch {
  const ParamEntry* entries;  // one per param, in list order, zero-size ones included
  int32_t n;
  const StepRef* steps;       // n of them; nullptr for ops without steps (SGD, norms)
  ScalarRef lr, grad_scale, found_inf, seed;  // optimizers; defaults 0, 1, 0, 0
  StoreMode store;
  cudaStream_t stream;        // current stream of the params' device (made current)
  Scratch scratch;
};

// The launchers, one per op (csrc/cuda/<op>.cu); after each, the ptr order of its entries.
// param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad), master
cudaError_t launch_adam_step(const Launch& l, double beta1, double beta2, double weight_decay,
                             double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay);
// param, grad, state_sum, master
cudaError_t launch_adagrad_step(const Launch& l, double lr_decay, double weight_decay, double eps,
                                bool maximize);
// param, grad, exp_avg, master
cudaError_t launch_lion_step(const Launch& l, double beta1, double beta2, double weight_decay,
                             bool maximize);
// param, grad, square_avg, grad_avg (centered), momentum_buffer (momentum), master
cudaError_t launch_rmsprop_step(const Launch& l, double alpha, double eps, double weight_decay,
                                double momentum, bool centered, bool maximize);
// param, grad, momentum_buffer (momentum != 0), master
cudaError_t launch_sgd_step(const Launch& l, double weight_decay, double momentum,
                            double dampening, bool nesterov, bool maximize);
// param, grad, exp_avg, exp_avg_sq, master
cudaError_t launch_lamb_step(const Launch& l, const ScalarRef& global_grad_norm, double beta1,
                             double beta2, double weight_decay, double eps, bool bias_correction,
                             double max_grad_norm);
// param, grad, row_var, col_var (factored: rows, cols set), variance (0-/1-D), master;
// all row-major
cudaError_t launch_adafactor_step(const Launch& l, double beta2_decay, double eps1, double eps2,
                                  double d, double weight_decay, bool maximize);
// tensor; writes norms[n] and *total
cudaError_t launch_multi_tensor_norm(const Launch& l, double norm_type, float* norms,
                                     float* total);

}  // namespace cuda
}  // namespace dlopt

// In a launcher: return the error of a step (a launch, a helper) unless it is cudaSuccess.
#define DLOPT_CUDA_TRY(expr)                          \
  do {                                                \
    const cudaError_t dlopt_err_ = (expr);            \
    if (dlopt_err_ != cudaSuccess) return dlopt_err_; \
  } while (0)
