// Python-level helpers of the `dlopt_kernels._C` module (csrc/python_fast_path.cpp).
#pragma once
#include <Python.h>

namespace dlopt {

// The method table of `dlopt_kernels._C` (collect_group).
PyMethodDef* fast_path_methods();

}  // namespace dlopt
