"""Helpers shared by the pure-torch reference kernels: the counter-based hash and
bf16 stochastic rounding of csrc/include/dlopt/rounding.h, on int64 tensors."""
from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """csrc/include/dlopt/rounding.h mix32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32  # wraps in int64; the low 32 bits stay exact
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sr_tensor_key(seed: int, tensor_index: int) -> int:
    return _mix32_int((seed & _M32) ^ ((tensor_index * 0x9E3779B9) & _M32))


def bf16_stochastic(x: Tensor, key: int) -> Tensor:
    """Round fp32 `x` to bf16 stochastically, with the kernels' random bits."""
    flat = x.reshape(-1)
    idx = torch.arange(flat.numel(), device=x.device, dtype=torch.int64) & _M32
    rnd = _mix32(idx ^ key) & 0xFFFF
    bits = flat.view(torch.int32).to(torch.int64) & _M32
    rounded = ((bits + rnd) >> 16) << 16
    out = (rounded & _M32).to(torch.int64)
    # back to a signed int32 bit pattern, then reinterpret as fp32 (exact bf16)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32).view(torch.float32)
    out = torch.where(torch.isnan(flat), flat, out)
    return out.to(torch.bfloat16).reshape(x.shape)
