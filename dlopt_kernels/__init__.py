"""dlopt_kernels: fused multi-tensor optimizer steps for PyTorch.

Kernels in C++ (CPU), CUDA and Triton behind public custom ops `torch.ops.dlopt.*`,
with a pure-torch reference for every other device, and drop-in `torch.optim`
classes in `dlopt_kernels.optim`.
"""
from dlopt_kernels import _lib

_lib.load()

from dlopt_kernels import backends, ops, optim  # noqa: E402
from dlopt_kernels.backends import available_backends  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "optim", "backends", "available_backends", "__version__"]
