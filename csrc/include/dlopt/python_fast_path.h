// Python-level helpers of the `dlopt_kernels._C` module (csrc/python_fast_path.cpp).
#pragma once
#include <Python.h>

namespace dlopt {

// The method table of `dlopt_kernels._C` (collect_group, call_compiled, triton_tables).
PyMethodDef* fast_path_methods();

// `_C.triton_tables` (csrc/python_lists.cpp): the tables of a Triton multi-tensor launch.
PyObject* triton_tables(PyObject*, PyObject* args);

// `_C.elementwise_lists_ok` (csrc/python_lists.cpp): the verdict of the Python list checks.
PyObject* elementwise_lists_ok(PyObject*, PyObject* args);

// `_C.on_device` (csrc/python_lists.cpp): whether a list's tensors share one device.
PyObject* on_device(PyObject*, PyObject* args);

}  // namespace dlopt
