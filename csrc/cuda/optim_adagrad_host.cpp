// dlopt_C::adagrad_step on CUDA, host half (g++): checks and layout here, kernels and
// their launcher in optim_adagrad.cu (dlopt/cuda_launch.h says why the split).
#include <torch/library.h>

#include "dlopt/cuda_host.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

void adagrad_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                       at::TensorList master_params, at::TensorList state_steps,
                       const at::Tensor& lr, double lr_decay, double weight_decay, double eps,
                       bool maximize, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& sr_seed) {
  check_elementwise_lists(params, grads, {{"state_sums", state_sums}}, master_params, state_steps,
                          sr_seed.has_value());
  if (params.empty()) return;
  cuda::HostCall call("adagrad_step", params);
  call.set_optimizer(state_steps, lr, grad_scale, found_inf, sr_seed, !master_params.empty());
  call.align({params, grads, state_sums, master_params}, {true, false, true, true});
  call.finish(cuda::launch_adagrad_step(call.launch(), lr_decay, weight_decay, eps, maximize));
  for (auto list : {params, state_sums, master_params, state_steps}) bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("adagrad_step", &adagrad_step_cuda); }

}  // namespace dlopt
