// dlopt_C::lamb_step on CUDA, host half (g++): checks and layout here, kernels and their
// launcher in optim_lamb.cu (dlopt/cuda_launch.h says why the split).
#include <torch/library.h>

#include "dlopt/cuda_host.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

void lamb_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList master_params,
                    at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
                    double weight_decay, double eps, bool bias_correction, double max_grad_norm,
                    const std::optional<at::Tensor>& global_grad_norm,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& sr_seed) {
  check_elementwise_lists(params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
                          master_params, state_steps, sr_seed.has_value());
  TORCH_CHECK(max_grad_norm <= 0.0 || global_grad_norm.has_value(),
              "dlopt::lamb_step: max_grad_norm > 0 needs global_grad_norm");
  if (params.empty()) return;
  cuda::HostCall call("lamb_step", params);
  call.set_optimizer(state_steps, lr, grad_scale, found_inf, sr_seed, !master_params.empty());
  const cuda::ScalarRef norm = call.scalar(global_grad_norm, "global_grad_norm", 0.0);
  call.align({params, grads, exp_avgs, exp_avg_sqs, master_params},
             {true, false, true, true, true});
  call.finish(cuda::launch_lamb_step(call.launch(), norm, beta1, beta2, weight_decay, eps,
                                     bias_correction, max_grad_norm));
  for (auto list : {params, exp_avgs, exp_avg_sqs, master_params, state_steps})
    bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("lamb_step", &lamb_step_cuda); }

}  // namespace dlopt
