// dlopt_C::sgd_step on CUDA, host half (g++): checks and layout here, kernels and their
// launcher in optim_sgd.cu (dlopt/cuda_launch.h says why the split).
#include <torch/library.h>

#include "dlopt/cuda_host.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList master_params, const at::Tensor& lr, double weight_decay,
                   double momentum, double dampening, bool nesterov, bool maximize,
                   c10::List<bool> new_buffers, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& sr_seed) {
  const bool use_momentum = momentum != 0.0;
  // Without momentum the buffers may be given, but are not ours to touch.
  const at::TensorList bufs = use_momentum ? momentum_buffers : at::TensorList();
  std::vector<NamedList> states;
  if (use_momentum) states.push_back({"momentum_buffers", bufs});
  check_elementwise_lists(params, grads, states, master_params, {}, sr_seed.has_value(),
                          /*has_steps=*/false);
  TORCH_CHECK(new_buffers.empty() || new_buffers.size() == params.size(), "dlopt: new_buffers has ",
              new_buffers.size(), " entries but params has ", params.size());
  if (params.empty()) return;
  cuda::HostCall call("sgd_step", params);
  call.set_optimizer({}, lr, grad_scale, found_inf, sr_seed, !master_params.empty());
  call.align({params, grads, bufs, master_params}, {true, false, true, true});
  if (use_momentum && !new_buffers.empty())
    for (cuda::ParamEntry& e : call.entries()) e.new_buffer = new_buffers.get(e.index);
  call.finish(cuda::launch_sgd_step(call.launch(), weight_decay, momentum, dampening, nesterov,
                                    maximize));
  for (auto list : {params, bufs, master_params}) bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("sgd_step", &sgd_step_cuda); }

}  // namespace dlopt
