// dlopt_C::rmsprop_step on CUDA, host half (g++): checks and layout here, kernels and
// their launcher in optim_rmsprop.cu (dlopt/cuda_launch.h says why the split).
#include <torch/library.h>

#include "dlopt/cuda_host.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

void rmsprop_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                       at::TensorList grad_avgs, at::TensorList momentum_buffers,
                       at::TensorList master_params, at::TensorList state_steps,
                       const at::Tensor& lr, double alpha, double eps, double weight_decay,
                       double momentum, bool centered, bool maximize,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& sr_seed) {
  // Lists the hyperparameters leave unused may be given, but are not ours to touch.
  const bool use_momentum = momentum > 0.0;  // torch: `if momentum > 0`
  const at::TensorList gas = centered ? grad_avgs : at::TensorList();
  const at::TensorList bufs = use_momentum ? momentum_buffers : at::TensorList();
  std::vector<NamedList> states{{"square_avgs", square_avgs}};
  if (centered) states.push_back({"grad_avgs", gas});
  if (use_momentum) states.push_back({"momentum_buffers", bufs});
  check_elementwise_lists(params, grads, states, master_params, state_steps, sr_seed.has_value());
  if (params.empty()) return;
  cuda::HostCall call("rmsprop_step", params);
  call.set_optimizer(state_steps, lr, grad_scale, found_inf, sr_seed, !master_params.empty());
  call.align({params, grads, square_avgs, gas, bufs, master_params},
             {true, false, true, true, true, true});
  call.finish(cuda::launch_rmsprop_step(call.launch(), alpha, eps, weight_decay, momentum,
                                        centered, maximize));
  for (auto list : {params, square_avgs, gas, bufs, master_params, state_steps})
    bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("rmsprop_step", &rmsprop_step_cuda); }

}  // namespace dlopt
