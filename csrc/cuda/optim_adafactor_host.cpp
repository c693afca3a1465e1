// dlopt_C::adafactor_step on CUDA, host half (g++): checks and the row-major stand-ins
// here, kernels and their launcher in optim_adafactor.cu (dlopt/cuda_launch.h says why
// the split).
#include <torch/library.h>

#include "dlopt/cuda_host.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

void adafactor_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                         at::TensorList col_vars, at::TensorList variances,
                         at::TensorList master_params, at::TensorList state_steps,
                         const at::Tensor& lr, double beta2_decay, double eps1, double eps2,
                         double d, double weight_decay, bool maximize,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& sr_seed) {
  check_factored_lists(params, grads, row_vars, col_vars, variances, master_params, state_steps,
                       sr_seed.has_value());
  if (params.empty()) return;
  cuda::HostCall call("adafactor_step", params);
  call.set_optimizer(state_steps, lr, grad_scale, found_inf, sr_seed, !master_params.empty());

  // The kernels index factored tensors as row-major [batch, rows, cols]: contiguous
  // stand-ins for other layouts, copied back by finish().
  ContiguousCopies& cc = call.contiguous();
  auto ptr = [&](const at::Tensor& t, bool mutated) {
    const at::Tensor c = cc.get(t, mutated);  // cc keeps a copy alive
    return mutated ? c.data_ptr() : const_cast<void*>(c.const_data_ptr());
  };
  std::vector<cuda::ParamEntry>& entries = call.entries();
  entries.assign(params.size(), cuda::ParamEntry{});
  for (size_t i = 0, kf = 0, kv = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    cuda::ParamEntry& e = entries[i];
    const bool factored = p.dim() >= 2;
    const size_t k = factored ? kf++ : kv++;
    e.index = static_cast<int32_t>(i);
    e.numel = p.numel();
    if (e.numel == 0) continue;  // its step is counted; nothing else (torch divides by zero)
    e.param = cuda::dtype_of(p.scalar_type());
    e.ptr[0] = ptr(p, true);
    e.ptr[1] = ptr(grads[i], false);
    if (!master_params.empty()) e.ptr[5] = ptr(master_params[i], true);
    if (factored) {
      e.ptr[2] = ptr(row_vars[k], true);
      e.ptr[3] = ptr(col_vars[k], true);
      e.state = cuda::dtype_of(row_vars[k].scalar_type());
      e.rows = p.size(-2);
      e.cols = p.size(-1);
    } else {
      e.ptr[4] = ptr(variances[k], true);
      e.state = cuda::dtype_of(variances[k].scalar_type());
    }
  }
  call.finish(cuda::launch_adafactor_step(call.launch(), beta2_decay, eps1, eps2, d,
                                          weight_decay, maximize));
  for (auto list : {params, row_vars, col_vars, variances, master_params, state_steps})
    bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("adafactor_step", &adafactor_step_cuda); }

}  // namespace dlopt
