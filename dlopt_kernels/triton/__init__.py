"""Triton kernels and their launchers, one module per op (`optim_adam.py` <->
`csrc/cpu/optim_adam.cpp`), with helpers every kernel shares in `_common.py`.

The kernels compile for CUDA and also run on CPU tensors under
`TRITON_INTERPRET=1` (set before triton is imported), which is how the CPU tests
exercise them. Nothing here is imported until a Triton kernel is first called
(see `dlopt_kernels/backends/triton.py`), so a missing triton costs nothing.
"""
