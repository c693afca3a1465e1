// dlopt_C::multi_tensor_norm on CUDA, host half (g++): checks and outputs here, kernels
// and their launcher in multi_tensor_norm.cu (dlopt/cuda_launch.h says why the split).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "dlopt/cuda_host.h"

namespace dlopt {
namespace {

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cuda(at::TensorList tensors,
                                                          double norm_type) {
  cuda::HostCall call("multi_tensor_norm", tensors, "tensors");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto dt = tensors[i].scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
                "dlopt::multi_tensor_norm: tensors[", i, "] has dtype ", dt,
                "; float32, bfloat16, float16 or float64 only");
  }
  call.align({tensors}, {false});  // only dense tensors are walked as flat memory
  const auto f32 = tensors[0].options().dtype(at::kFloat);
  at::Tensor norms = at::empty({static_cast<int64_t>(tensors.size())}, f32);
  at::Tensor total = at::empty({}, f32);
  call.finish(cuda::launch_multi_tensor_norm(call.launch(), norm_type, norms.data_ptr<float>(),
                                             total.data_ptr<float>()));
  return {norms, total};
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("multi_tensor_norm", &multi_tensor_norm_cuda); }

}  // namespace dlopt
