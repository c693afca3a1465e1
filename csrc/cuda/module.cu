// dlopt_kernels._C_cuda is imported as a Python extension module
// (dlopt_kernels/_lib.py), so it needs a PyInit function; importing it loads
// this library and runs the TORCH_LIBRARY_IMPL(dlopt_C, CUDA, ...) blocks of
// the other .cu files. The module itself is empty (the CPU twin is in
// csrc/registration.cpp). Kept in its own file so each op file stays one op.
#include <Python.h>

PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
