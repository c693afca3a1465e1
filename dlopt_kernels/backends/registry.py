"""Which implementation runs an op: the backend registry.

Each public op names its kernels per backend when it is defined
(`dlopt_kernels.ops._library.define(..., backends=...)`). `resolve`
picks one per call from the tensors' device and the requested backend:

- ``auto`` (or the ``DLOPT_BACKEND`` environment variable when the caller said
  auto): CUDA tensors -> cuda > triton > reference; CPU tensors -> cpu > reference;
  any other device (MPS, XLA, ...) -> reference. A fall back past a missing
  compiled library is logged once.
- an explicit backend that cannot run here raises `BackendUnavailableError`
  saying why.

An op may also name the param dtypes a backend's kernels take (`register(...,
dtypes=...)`): the compiled and Triton optimizer kernels take float32, bfloat16 and
float16 params, so float64 params (and complex128, stepped as float64 views) run on
the reference backend, in float64, under ``auto``, and an explicit backend that cannot
take them is refused.

An op may name the backends whose kernels are not deterministic on a GPU
(`register(..., nondeterministic=why)`: Adafactor's CUDA and Triton kernels add with
fp64 atomics, in an order that varies run to run). Under
``torch.use_deterministic_algorithms(True)`` ``auto`` passes over them (logged once),
and an explicit such backend is refused with `BackendUnavailableError`, or warned
about under ``warn_only=True``, as torch treats its own nondeterministic ops.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import warnings
from typing import Callable

import torch

from dlopt_kernels import _lib

BACKENDS = ("cpu", "cuda", "triton", "reference")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_KERNELS: dict[tuple[str, str], Callable] = {}
_DTYPES: dict[tuple[str, str], tuple] = {}  # (op, backend) -> param dtypes, where limited
_NONDET: dict[tuple[str, str], str] = {}  # (op, backend) -> why not deterministic on a GPU
_CACHE: dict[tuple, tuple[str, Callable]] = {}
_LOGGED: set = set()
log = logging.getLogger("dlopt_kernels")


class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot run on this machine or device."""


def register(op: str, backend: str, kernel: Callable | str, dtypes: tuple | None = None,
             nondeterministic: str | None = None) -> None:
    """Register `kernel` for (`op`, `backend`): a callable, or "module:function",
    imported on first use (so triton is only imported when a triton kernel runs).
    `dtypes`: the param dtypes the kernel takes (None: any the op takes).
    `nondeterministic`: why the kernel's results may vary run to run on a GPU (None:
    they do not)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _KERNELS[(op, backend)] = kernel
    for table, value in ((_DTYPES, None if dtypes is None else tuple(dtypes)),
                         (_NONDET, nondeterministic)):
        if value is None:
            table.pop((op, backend), None)
        else:
            table[(op, backend)] = value
    _CACHE.clear()


def _kernel(op: str, backend: str) -> Callable:
    k = _KERNELS[(op, backend)]
    if isinstance(k, str):
        module, _, attr = k.partition(":")
        k = _KERNELS[(op, backend)] = getattr(importlib.import_module(module), attr)
    return k


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_unavailable(backend: str, device_type: str) -> str | None:
    """None if `backend` can run tensors of `device_type` here, else the reason."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs CPU tensors, not {device_type} tensors"
        if not _lib.LOADED["cpu"]:
            return f"the C++ library failed to load: {_lib.LOAD_ERRORS.get('cpu')}"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs CUDA tensors, not {device_type} tensors"
        if not _lib.LOADED["cuda"]:
            return f"the CUDA library is not available: {_lib.LOAD_ERRORS.get('cuda')}"
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device_type == "cuda" or (device_type == "cpu" and triton_interpreted()):
            return None
        return (f"triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                f"not {device_type} tensors")
    return f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}"


def check_backend_name(backend: str, arg: str = "backend") -> str:
    if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
        raise ValueError(f"{arg} must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


def requested_backend(backend: str) -> str:
    """The caller's choice, with DLOPT_BACKEND standing in for 'auto'."""
    if backend == "auto":
        env = os.environ.get("DLOPT_BACKEND", "auto") or "auto"
        return check_backend_name(env, "DLOPT_BACKEND")
    return backend


def why_not_dtype(op: str, backend: str, dtype: torch.dtype | None) -> str | None:
    """None if `backend`'s kernel of `op` takes params of `dtype`, else the reason."""
    dtypes = _DTYPES.get((op, backend))
    if dtype is None or dtypes is None or dtype in dtypes:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    return f"its kernels take {names} params, not {str(dtype).replace('torch.', '')}"


def why_nondeterministic(op: str, backend: str, device_type: str) -> str | None:
    """None if `backend`'s kernel of `op` gives the same results run to run on
    `device_type`, else why not (only GPU kernels with atomics vary)."""
    return _NONDET.get((op, backend)) if device_type == "cuda" else None


def _refuse_nondeterministic(op: str, backend: str, why: str) -> None:
    """An explicit nondeterministic backend under torch.use_deterministic_algorithms:
    refused, or a warning under warn_only=True (torch's rule for its own ops)."""
    msg = (f"backend={backend!r} cannot run {op} deterministically ({why}), and "
           f"torch.use_deterministic_algorithms(True) is set; backend='auto' or "
           f"'reference' runs a deterministic kernel")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg + " (warn_only=True: running it anyway)", stacklevel=3)
    else:
        raise BackendUnavailableError(msg)


def resolve(op: str, device: torch.device, backend: str = "auto",
            dtype: torch.dtype | None = None, quiet: bool = False) -> tuple[str, Callable]:
    """The (backend name, kernel) that runs `op` on `device` for the request `backend`,
    for params of `dtype` (None: any, as for ops whose kernels take every dtype), and
    under torch.use_deterministic_algorithms(True) a deterministic one.
    quiet: do not log a fall back (`dlopt-kernels info` reports it itself)."""
    requested = requested_backend(backend)
    deterministic = torch.are_deterministic_algorithms_enabled()
    key = (op, device.type, requested, dtype, deterministic)
    hit = _CACHE.get(key)
    if hit is None:
        choice = _choose(op, device.type, requested, dtype, deterministic, quiet)
        hit = _CACHE[key] = (choice, _kernel(op, choice))
    # an explicit backend is refused on every call, not only the first
    why = why_nondeterministic(op, hit[0], device.type) if deterministic else None
    if why is not None and requested != "auto":
        _refuse_nondeterministic(op, hit[0], why)
    return hit


def _choose(op: str, device_type: str, requested: str, dtype: torch.dtype | None,
            deterministic: bool, quiet: bool) -> str:
    """resolve's choice, uncached: the requested backend if it can run `op` here, else
    an error; for auto the first usable one, logging a fall back once."""
    if requested != "auto":
        reason = why_unavailable(requested, device_type)
        if reason is None and (op, requested) not in _KERNELS:
            reason = f"op {op!r} has no {requested} kernel"
        if reason is None:
            reason = why_not_dtype(op, requested, dtype)
            if reason is not None:
                reason += "; backend='auto' or 'reference' runs them, in their own precision"
        if reason is not None:
            raise BackendUnavailableError(f"backend={requested!r} cannot run {op}: {reason}")
        return requested
    else:
        order = _AUTO_ORDER.get(device_type, ("reference",))
        usable = [b for b in order if (op, b) in _KERNELS and why_unavailable(b, device_type) is None]
        choice = next(b for b in usable if why_not_dtype(op, b, dtype) is None
                      and not (deterministic and why_nondeterministic(op, b, device_type)))
        if quiet:
            pass
        elif deterministic and choice != usable[0] and why_nondeterministic(
                op, usable[0], device_type) and (op, device_type, "det") not in _LOGGED:
            _LOGGED.add((op, device_type, "det"))
            log.warning("dlopt_kernels: %s on %s uses the %s backend under "
                        "torch.use_deterministic_algorithms(True) (the %s backend: %s)", op,
                        device_type, choice, usable[0],
                        why_nondeterministic(op, usable[0], device_type))
        elif choice != usable[0] and (op, device_type, dtype) not in _LOGGED:
            # a dtype the fast kernels do not take (float64): said once, not per step
            _LOGGED.add((op, device_type, dtype))
            log.warning("dlopt_kernels: %s runs %s params on %s with the %s backend, in "
                        "their own precision (the %s backend: %s)", op,
                        str(dtype).replace("torch.", ""), device_type, choice, usable[0],
                        why_not_dtype(op, usable[0], dtype))
        elif choice != order[0] and (op, device_type) not in _LOGGED:
            _LOGGED.add((op, device_type))
            log.warning("dlopt_kernels: %s on %s uses the %s backend (%s)", op, device_type,
                        choice, why_unavailable(order[0], device_type))
        return choice


def available_backends(device_type: str = "cpu") -> list[str]:
    """Backends that can run tensors of `device_type` on this machine."""
    return [b for b in BACKENDS if why_unavailable(b, device_type) is None]


def clear_cache() -> None:
    """Forget resolved choices (after changing DLOPT_BACKEND or TRITON_INTERPRET)."""
    _CACHE.clear()
