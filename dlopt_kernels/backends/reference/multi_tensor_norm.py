"""Pure-torch multi_tensor_norm (the maths of csrc/include/dlopt/norm_math.h): per
tensor a raw value (sum of terms, or max / min of |x|) accumulated in float64, the
norm from it, and the total from the raw values; device-agnostic, no host sync."""
from __future__ import annotations

import math

import torch
from torch import Tensor

L2, L1, INF, NEG_INF, L0, P = range(6)


def norm_kind(ord: float) -> int:
    """norm_math.h norm_kind."""
    if ord == 2.0:
        return L2
    if ord == 1.0:
        return L1
    if ord == math.inf:
        return INF
    if ord == -math.inf:
        return NEG_INF
    if ord == 0.0:
        return L0
    return P


def _raw(t: Tensor, kind: int, ord: float) -> Tensor:
    x = t.detach().reshape(-1).to(torch.float64)
    if kind in (INF, NEG_INF):
        if x.numel() == 0:
            return x.new_full((), 0.0 if kind == INF else math.inf)
        a = x.abs()
        return a.amax() if kind == INF else a.amin()  # amax / amin propagate NaN
    if kind == L2:
        terms = x * x
    elif kind == L0:
        terms = (x != 0).to(torch.float64)
    elif kind == P:
        terms = x.abs().pow(ord)
    else:
        terms = x.abs()
    return terms.sum()


def _finish(raw: Tensor, kind: int, ord: float) -> Tensor:
    if kind == L2:
        return raw.sqrt()
    if kind == P:
        return raw.pow(1.0 / ord)
    return raw


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def multi_tensor_norm(tensors, norm_type: float):
    dev = tensors[0].device
    for i, t in enumerate(tensors):
        if t.dtype not in _DTYPES:
            raise TypeError(f"dlopt::multi_tensor_norm: tensors[{i}] has dtype {t.dtype}; "
                            "float32, bfloat16, float16 or float64 only")
        if t.device != dev:
            raise ValueError(f"dlopt::multi_tensor_norm: tensors[{i}] is on {t.device} but "
                             f"tensors[0] is on {dev}; call it once per device")
    kind = norm_kind(float(norm_type))
    raws = torch.stack([_raw(t, kind, norm_type) for t in tensors])
    norms = _finish(raws, kind, norm_type)
    if kind == L0:
        total = (raws != 0).sum().to(torch.float64)
    elif kind == INF:
        total = raws.amax()
    elif kind == NEG_INF:
        total = raws.amin()
    else:
        total = _finish(raws.sum(), kind, norm_type)
    return norms.to(torch.float32), total.to(torch.float32)
