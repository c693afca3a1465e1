// dlopt_C::lion_step on CUDA, host half (g++): checks and layout here, kernels and their
// launcher in optim_lion.cu (dlopt/cuda_launch.h says why the split).
#include <torch/library.h>

#include "dlopt/cuda_host.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

void lion_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList master_params, at::TensorList state_steps,
                    const at::Tensor& lr, double beta1, double beta2, double weight_decay,
                    bool maximize, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& sr_seed) {
  check_elementwise_lists(params, grads, {{"exp_avgs", exp_avgs}}, master_params, state_steps,
                          sr_seed.has_value());
  if (params.empty()) return;
  cuda::HostCall call("lion_step", params);
  call.set_optimizer(state_steps, lr, grad_scale, found_inf, sr_seed, !master_params.empty());
  call.align({params, grads, exp_avgs, master_params}, {true, false, true, true});
  call.finish(cuda::launch_lion_step(call.launch(), beta1, beta2, weight_decay, maximize));
  for (auto list : {params, exp_avgs, master_params, state_steps}) bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("lion_step", &lion_step_cuda); }

}  // namespace dlopt
