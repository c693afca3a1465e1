"""Gradient-norm clipping with the norm from one fused multi-tensor op.

`clip_grad_norm_` and `get_total_norm` take torch.nn.utils' arguments and return its
results; the difference is how the norm is computed: `torch.ops.dlopt.multi_tensor_norm`
once per device (every dtype in one call, one pass over the grads), instead of a norm
per (device, dtype) group followed by more small ops. The scaling computes torch's
products, so the grads come out as torch's do: on the CPU with one multi-tensor kernel
(`dlopt_C::multi_tensor_scale_`; torch's CPU `_foreach_mul_` runs one kernel per
tensor), elsewhere with torch's own `torch.nn.utils.clip_grads_with_norm_` (one
`torch._foreach_mul_` per device and dtype, already one fused launch on a GPU).
"""
from __future__ import annotations

import functools
import types
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from dlopt_kernels import _lib
from dlopt_kernels.backends import registry
from dlopt_kernels.ops._dtensor import register_if_loaded
from dlopt_kernels.ops.multi_tensor_norm import multi_tensor_norm

_TensorOrTensors = Union[Tensor, Iterable[Tensor]]
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# dlopt_C::multi_tensor_scale_, if the C++ library loaded
_CPU_SCALE = torch.ops.dlopt_C.multi_tensor_scale_ if _lib.LOADED["cpu"] else None


def _clip_grads_with_norm_(parameters: list, max_norm: float, total_norm: Tensor,
                           foreach: Optional[bool], grads: Optional[list] = None) -> None:
    """torch.nn.utils.clip_grads_with_norm_, the same products: grads that are all plain
    dense CPU tensors of fp32/bf16/fp16 are scaled by one multi-tensor kernel in eager
    mode (foreach None or True); anything else goes to torch's function. `grads`: the
    params' grads, when the caller has already collected them."""
    if grads is None:
        grads = [p.grad for p in parameters if p.grad is not None]
    scale = _CPU_SCALE
    if (scale is None or foreach is False or torch.compiler.is_compiling() or not grads
            or total_norm.device.type != "cpu"
            or any(type(g) is not Tensor or g.device.type != "cpu" or g.is_sparse
                   or g.dtype not in _SCALE_DTYPES for g in grads)):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
        return
    clip_coef = float(max_norm) / (total_norm + 1e-6)  # as torch: no sync, no branch
    scale(grads, torch.clamp(clip_coef, max=1.0))


def _check_norm_type(norm_type) -> float:
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float, str)):
        raise TypeError(f"norm_type must be a float (or 'inf'), got {type(norm_type).__name__}")
    try:
        return float(norm_type)
    except ValueError:
        raise ValueError(f"norm_type must be a float (or 'inf'), got {norm_type!r}") from None


@torch.no_grad()
def get_total_norm(tensors: _TensorOrTensors, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False, foreach: Optional[bool] = None, *,
                   backend: str = "auto") -> Tensor:
    r"""The norm of `tensors` viewed as one vector: ``torch.nn.utils.get_total_norm``.

    Computed by ``torch.ops.dlopt.multi_tensor_norm`` in fp32 with wider accumulation,
    one call per device; the result is a 0-dim tensor on the first tensor's device, of
    the dtype torch would return (the promotion of the tensors' dtypes), and nothing
    waits for the device unless `error_if_nonfinite` is True (that check reads the value,
    as in torch). `norm_type` is any float or "inf" (for 0 the total counts the tensors
    with a non-zero norm, as in torch). `foreach` is accepted for compatibility: the norm
    is always the fused op. `backend` chooses the op's kernels ("auto", "cpu", "cuda",
    "triton", "reference").
    """
    registry.check_backend_name(backend)
    norm_type = _check_norm_type(norm_type)
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    if not tensors:
        return torch.tensor(0.0)
    register_if_loaded()  # DTensor grads (FSDP2): the norm op's rule
    first_device = tensors[0].device
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    totals = [multi_tensor_norm(ts, norm_type, backend)[1] for ts in by_device.values()]
    if len(totals) == 1:
        total = totals[0]
    else:
        totals = torch.stack([t.to(first_device, non_blocking=True) for t in totals])
        # per-device totals combine like per-tensor norms; for ord 0 each device's total
        # already counts its tensors with a non-zero norm, so the counts add up
        total = totals.sum() if norm_type == 0.0 else torch.linalg.vector_norm(totals, norm_type)
    total = total.to(functools.reduce(torch.promote_types, (t.dtype for t in tensors)))
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`")
    return total


@torch.no_grad()
def clip_grad_norm_(parameters: _TensorOrTensors, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None, *,
                    backend: str = "auto") -> Tensor:
    r"""Clip the gradient norm of `parameters` in place: a drop-in for
    ``torch.nn.utils.clip_grad_norm_``.

    The total norm of all grads (as one vector) is computed by the fused op
    ``torch.ops.dlopt.multi_tensor_norm`` (one call per device, no Python loop over
    tensors), then every grad is multiplied by ``min(max_norm / (total + 1e-6), 1)``
    exactly as torch does: on the CPU by one multi-tensor kernel, elsewhere with
    ``torch._foreach_mul_`` per device and dtype (``foreach=False`` uses a loop of
    ``mul_``; ``foreach=True`` on a device without foreach kernels raises, as in torch).
    No host sync unless ``error_if_nonfinite``.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        max_norm (float): max norm of the gradients.
        norm_type (float): order of the norm, any float or ``'inf'`` (default 2.0).
        error_if_nonfinite (bool): raise if the total norm is nan or inf.
        foreach (bool, optional): how the grads are scaled, as in torch.
        backend (str): kernels of the norm op: "auto", "cpu", "cuda", "triton",
            "reference" (our extra, keyword only).

    Returns:
        The total norm of the gradients (a 0-dim tensor on the first grad's device).

    Differences from torch: the total is computed in fp32 with wider accumulation and
    then cast to torch's result dtype (for bf16 / fp16 grads it is at least as
    accurate as torch's, which rounds each per-tensor norm to the grad dtype first; for
    float64 grads it carries fp32 accuracy); an empty grad is not an error for the
    inf / -inf norms (it contributes nothing).
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=3)
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach, backend=backend)
    _clip_grads_with_norm_(parameters, max_norm, total_norm, foreach, grads)
    return total_norm
