"""The `dlopt` op namespace.

Ops are defined with `torch.library.Library` and a schema string rather than
`torch.library.custom_op`: custom_op bumps the version counter of every mutated
tensor in Python, which for a 1,000-tensor optimizer step costs more than the
kernel. Here the compiled kernels bump versions in C++ and the Python path (one
`CompositeExplicitAutograd` impl that routes by backend) stays thin. Each op gets a
fake (meta) impl, so it traces under torch.compile and passes opcheck.

The optimizer step ops (`define_step`) take params of float32, bfloat16 and float16 on
every backend, and float64 on the reference backend and the compiled backends an op
names (Adam's C++ CPU kernel), which compute in float64 for them; under backend="auto"
float64 params go to the first of those that can run. Ops whose torch.optim twin takes complex
params step them as torch does, as their real views (`torch.view_as_real`: real and
imaginary parts as two real elements).
"""
from __future__ import annotations

from typing import Callable

import torch

from dlopt_kernels import _lib
from dlopt_kernels.backends.registry import register, resolve

LIB = torch.library.Library("dlopt", "DEF")

# The param dtypes of the compiled (C++, CUDA) and Triton optimizer kernels; float64
# params run on the reference backend (registry.resolve), or on a compiled one the op
# names (define_step's float64_backends).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_COMPLEX_OK: set[str] = set()  # step ops that take complex params (as real views)


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


def define_step(schema: str, backends: dict[str, Callable | str], complex_params: bool,
                float64_backends: tuple[str, ...] = (),
                nondeterministic: dict[str, str] | None = None):
    """Define the optimizer step op `schema` (params first, `str backend` last, returns
    nothing): routed by the params' device and dtype, float64 params to the reference
    backend or to the compiled ones named in `float64_backends` (whose kernels compute
    in double for them); `complex_params`: complex params are stepped as their real
    views, as the op's torch.optim twin does (else refused with a TypeError);
    `nondeterministic`: backend -> why its kernels' results vary run to run on a GPU
    (registry.resolve keeps them out of torch.use_deterministic_algorithms)."""
    name = schema.split("(", 1)[0]
    nargs = schema.split("->", 1)[0].count(",") + 1

    def impl(*args) -> None:
        if not args[0]:
            return
        if len(args) < nargs:  # backend left at its default: the dispatcher omits it
            args = (*args, "auto")
        args = real_views(name, args)
        _, kernel = resolve(name, args[0][0].device, args[-1], args[0][0].dtype)
        kernel(*args[:-1])

    def fake(*args) -> None:
        return None

    impl.__name__ = f"{name}_impl"
    if complex_params:
        _COMPLEX_OK.add(name)
    op = define(schema, impl, fake, backends={})
    for backend, kernel in backends.items():
        dtypes = KERNEL_DTYPES + ((torch.float64,) if backend in float64_backends else ())
        register(name, backend, kernel, dtypes=None if backend == "reference" else dtypes,
                 nondeterministic=(nondeterministic or {}).get(backend))
    return op


def real_views(name: str, args: tuple) -> tuple:
    """`args` (params first) with every complex tensor of its tensor lists replaced by
    its real view, when the params are complex (the first one decides, as it decides
    the backend; the others must then match it, which the kernels' checks enforce).
    A conjugated grad is read resolved; a conjugated param or state (written in place)
    is refused."""
    params = args[0]
    if not params or not params[0].is_complex():
        return args
    if name not in _COMPLEX_OK:
        raise TypeError(f"dlopt::{name}: complex params are not supported (got "
                        f"{params[0].dtype}); only the optimizers whose torch.optim twin "
                        f"takes complex params do")
    out = list(args)
    for k, a in enumerate(args):
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            out[k] = [_real(t, name, k) for t in a]
    return tuple(out)


def _real(t: torch.Tensor, name: str, k: int) -> torch.Tensor:
    if not t.is_complex():
        return t
    if t.is_conj():
        if k != 1:  # grads (argument 1) are only read
            raise TypeError(f"dlopt::{name}: a conjugated view of a complex tensor cannot be "
                            f"updated in place (resolve it with .resolve_conj() first)")
        t = t.resolve_conj()
    if t.dtype == torch.complex32:
        raise TypeError(f"dlopt::{name}: complex32 params are not supported (complex64 and "
                        f"complex128 are)")
    return torch.view_as_real(t)


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
    args = real_views(name, args)
    backend, kernel = resolve(name, args[0][0].device, args[-1], args[0][0].dtype)
    call = _lib.c_function("call_compiled") if backend in ("cpu", "cuda") else None
    if call is not None:
        return call(name, *args[:-1])
    return kernel(*args[:-1])
