"""The `dlopt` op namespace.

Ops are defined with `torch.library.Library` and a schema string rather than
`torch.library.custom_op`: custom_op bumps the version counter of every mutated
tensor in Python, which for a 1,000-tensor optimizer step costs more than the
kernel. Here the compiled kernels bump versions in C++ and the Python path (one
`CompositeExplicitAutograd` impl that routes by backend) stays thin. Each op gets a
fake (meta) impl, so it traces under torch.compile and passes opcheck.
"""
from __future__ import annotations

from typing import Callable

import torch

from dlopt_kernels import _lib
from dlopt_kernels.backends.registry import register

LIB = torch.library.Library("dlopt", "DEF")


def define(schema: str, impl: Callable, fake: Callable, backends: dict[str, Callable | str]):
    """Define `dlopt::<name>` from `schema` with its routing `impl`, its `fake`, and its
    kernels per backend (a callable or "module:function", imported on first use);
    return the op overload packet."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"dlopt::{name}", fake, lib=LIB)
    for backend, kernel in backends.items():
        register(name, backend, kernel)
    return getattr(torch.ops.dlopt, name)


def compiled(name: str) -> Callable:
    """The kernel of the compiled libraries: `torch.ops.dlopt_C.<name>`, whose CPU and
    CUDA implementations the dispatcher picks by device."""

    def kernel(*args):
        return getattr(torch.ops.dlopt_C, name)(*args)

    kernel.__name__ = name
    return kernel


def run_kernel(name: str, args) -> None:
    """Call the kernel op `name` would pick for `args` (its arguments in schema order,
    params first and backend last) directly: no dispatcher and no routing impl, and a
    compiled kernel through `_C.call_compiled`, which also skips torch's per-tensor
    argument conversion. For eager callers that already hold plain tensors (the
    optimizers' fast path, the DTensor rules); everything else calls the op."""
    from dlopt_kernels.backends.registry import resolve
    backend, kernel = resolve(name, args[0][0].device, args[-1])
    call = _lib.c_function("call_compiled") if backend in ("cpu", "cuda") else None
    if call is not None:
        return call(name, *args[:-1])
    return kernel(*args[:-1])
