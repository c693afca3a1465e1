// The private op namespace `dlopt_C` and build facts for `dlopt-kernels info`.
// Each op's schema sits beside its CPU kernel (csrc/cpu/<op>.cpp, in a
// TORCH_LIBRARY_FRAGMENT, since the CPU library is always built); device files
// register implementations with TORCH_LIBRARY_IMPL(dlopt_C, CPU|CUDA, m). The
// public `torch.ops.dlopt.*` contract lives in Python (dlopt_kernels/ops/).
//
// Why the classic TORCH_LIBRARY API and not the ABI-stable one: the stable
// API's boxed kernels on torch 2.11-2.13 do not accept Tensor[] arguments for
// every list we need (mutable tensor lists), and multi-tensor ops are our core.
#include <Python.h>
#include <string>
#include <torch/library.h>

#include "dlopt/python_fast_path.h"

namespace {

std::string build_info() {
  std::string isa = "generic";
#if defined(__AVX512F__)
  isa = "avx512";
#elif defined(__AVX2__)
  isa = "avx2";
#elif defined(__ARM_NEON)
  isa = "neon";
#endif
#if defined(DLOPT_WITH_CUDA)
  return "cpu_isa=" + isa + ";cuda=1;cuda_arch=" DLOPT_CUDA_ARCH_STR;
#else
  return "cpu_isa=" + isa + ";cuda=0";
#endif
}

}  // namespace

TORCH_LIBRARY(dlopt_C, m) {
  m.def("build_info() -> str", &build_info);
}

// The compiled ops have no autograd formula (the optimizer steps run under no_grad and
// bump the version counters they write themselves). Without a registration for the
// Autograd key, every call went through torch's boxed autograd fallback, which boxes
// each tensor of every list into an IValue and unboxes it again (most of what perf
// showed outside the kernel for 1,000 tensors). A fallthrough goes straight to the
// CPU / CUDA kernel.
TORCH_LIBRARY_IMPL(dlopt_C, Autograd, m) {
  for (const char* op : {"adam_step", "sgd_step", "adagrad_step", "rmsprop_step",
                         "adafactor_step", "lion_step", "lamb_step", "multi_tensor_norm"})
    m.impl(op, torch::CppFunction::makeFallthrough());
}

// Importing dlopt_kernels._C loads this library and so runs the registrations
// above; the module's only functions are the optimizers' fast path helpers.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          dlopt::fast_path_methods()};
  return PyModule_Create(&module_def);
}
