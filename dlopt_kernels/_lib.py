"""Guarded loading of the compiled kernel libraries.

A missing or broken build must never make the package unimportable: the pure-torch
reference backend still works. What failed is kept in LOAD_ERRORS, reported once as
a warning, and repeated in the error raised when a compiled backend is asked for.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings

import torch

LOAD_ERRORS: dict[str, str] = {}
LOADED: dict[str, bool] = {"cpu": False, "cuda": False}


def _load(module: str, key: str) -> None:
    try:
        importlib.import_module(module)
        LOADED[key] = True
    except Exception as exc:  # ImportError, OSError (undefined symbol), ...
        LOAD_ERRORS[key] = f"{type(exc).__name__}: {exc}"


def load() -> None:
    _load("dlopt_kernels._C", "cpu")
    if LOADED["cpu"] and torch.version.cuda:
        if importlib.util.find_spec("dlopt_kernels._C_cuda") is not None:
            _load("dlopt_kernels._C_cuda", "cuda")
        else:
            LOAD_ERRORS["cuda"] = "dlopt_kernels._C_cuda was not built (no nvcc or DLOPT_BUILD_CUDA=0)"
    elif not torch.version.cuda:
        LOAD_ERRORS["cuda"] = "this torch build has no CUDA support"
    if not LOADED["cpu"]:
        warnings.warn(
            "dlopt_kernels: the compiled C++ library could not be loaded "
            f"({LOAD_ERRORS['cpu']}); falling back to the pure-torch reference backend. "
            "Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def build_info() -> dict[str, str]:
    """Facts the C++ library recorded at build time (CPU ISA, CUDA arch)."""
    if not LOADED["cpu"]:
        return {}
    raw = torch.ops.dlopt_C.build_info()
    return dict(item.split("=", 1) for item in raw.split(";") if "=" in item)


@functools.lru_cache(maxsize=None)
def c_function(name: str):
    """`dlopt_kernels._C.<name>`, one of the C++ library's Python functions
    (csrc/python_fast_path.cpp, csrc/python_lists.cpp), or None when the library did
    not load (callers then take their Python twin)."""
    if not LOADED["cpu"]:
        return None
    from dlopt_kernels import _C
    return getattr(_C, name, None)
