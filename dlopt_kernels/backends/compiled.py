"""The compiled libraries (C++ CPU and CUDA): both register their kernels under
`torch.ops.dlopt_C`, and the dispatcher picks the CPU or CUDA one by device."""
import torch

from dlopt_kernels.backends.registry import register


@register("adam_step", "cpu")
@register("adam_step", "cuda")
def adam_step(*args) -> None:
    torch.ops.dlopt_C.adam_step(*args)
