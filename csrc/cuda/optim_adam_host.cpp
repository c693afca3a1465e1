// dlopt_C::adam_step on CUDA, host half (g++): checks and layout here, kernels and their
// launcher in optim_adam.cu (dlopt/cuda_launch.h says why the split).
#include <torch/library.h>

#include "dlopt/cuda_host.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList master_params, at::TensorList state_steps, const at::Tensor& lr,
                    double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                    bool maximize, bool decoupled_weight_decay,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& sr_seed) {
  // max_exp_avg_sqs may be given without amsgrad, but is not ours to touch then.
  const at::TensorList vmax = amsgrad ? max_exp_avg_sqs : at::TensorList();
  std::vector<NamedList> states{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) states.push_back({"max_exp_avg_sqs", vmax});
  check_elementwise_lists(params, grads, states, master_params, state_steps, sr_seed.has_value());
  check_same_length(params, max_exp_avg_sqs, "max_exp_avg_sqs", true);
  if (params.empty()) return;
  cuda::HostCall call("adam_step", params);
  call.set_optimizer(state_steps, lr, grad_scale, found_inf, sr_seed, !master_params.empty());
  call.align({params, grads, exp_avgs, exp_avg_sqs, vmax, master_params},
             {true, false, true, true, true, true});
  call.finish(cuda::launch_adam_step(call.launch(), beta1, beta2, weight_decay, eps, amsgrad,
                                     maximize, decoupled_weight_decay));
  for (auto list : {params, exp_avgs, exp_avg_sqs, vmax, master_params, state_steps})
    bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("adam_step", &adam_step_cuda); }

}  // namespace dlopt
