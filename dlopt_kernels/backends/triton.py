"""Triton kernels, imported lazily so that a missing triton costs nothing."""
from dlopt_kernels.backends.registry import register


@register("adam_step", "triton")
def adam_step(*args) -> None:
    from dlopt_kernels.triton.optim_adam import adam_step as kernel

    kernel(*args)
