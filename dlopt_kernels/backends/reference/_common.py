"""Helpers shared by the pure-torch reference kernels: the counter-based hash and
bf16 stochastic rounding of csrc/include/dlopt/rounding.h, on int64 tensors."""
from __future__ import annotations

import math
from typing import Optional

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


# --- maths every optimizer shares (twins of csrc/include/dlopt/cpu_multi_tensor.h,
# weight_decay.h and cpu_storage.h store_param) ------------------------------------


def skip_step(found_inf: Optional[Tensor]) -> bool:
    """GradScaler found an inf/NaN (found_inf != 0, NaN included): skip the whole step."""
    return found_inf is not None and float(found_inf) != 0.0


def grad_multiplier(maximize: bool, grad_scale: Optional[Tensor]) -> float:
    """(maximize ? -1 : 1) / grad_scale, in double; the kernels round it to fp32 once."""
    return (-1.0 if maximize else 1.0) / (float(grad_scale) if grad_scale is not None else 1.0)


def l2_decayed_grad(g: torch.Tensor, p: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """weight_decay.h l2_decayed_grad: g + weight_decay * p, in float64 with one rounding
    as torch's CPU `grad.add(param, alpha=weight_decay)` (and the C++ kernels' fmadd),
    in fp32 with two."""
    return g.add(p, alpha=weight_decay) if g.dtype == torch.float64 else g + weight_decay * p


def decoupled_decay_factor(lr: float, weight_decay: float) -> float:
    """weight_decay.h: p <- p * (1 - lr * weight_decay), the factor in double."""
    return 1.0 - lr * weight_decay


def compute_dtype(p: Tensor) -> torch.dtype:
    """The arithmetic's dtype for param `p`: float32 (the kernels'), or float64 for
    float64 params (which only this backend runs, in their own precision, as torch)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def rounded(x: float, dtype: torch.dtype) -> float:
    """`x` as the kernels use a coefficient they keep in fp32: rounded to float32,
    unless the arithmetic is float64."""
    return x if dtype == torch.float64 else float(torch.tensor(x, dtype=torch.float32))


def count_steps(state_steps) -> list[float]:
    """Every step count += 1 (zero-size params' too, as torch counts them) and the new
    counts as floats, read from the device in one transfer: a float() per tensor would
    wait for the device once per tensor (this backend runs on MPS, XLA, and float64 on a
    GPU)."""
    if not state_steps:
        return []
    torch._foreach_add_(list(state_steps), 1)
    first = state_steps[0].device
    if any(s.device != first for s in state_steps):
        return [float(s) for s in state_steps]
    return torch.cat([s.reshape(1) for s in state_steps]).tolist()


def each_tensor(params, grads, master_params, state_steps, grad_mul: float):
    """The loop every element-wise reference step runs: each param's step counted first
    (all of them, zero-size ones included, as torch counts them; `state_steps` empty for
    ops without steps), then for each param with elements (i, p, pf, g, master, step),
    its step count as a float (None without steps) after its
    value in the arithmetic's dtype (compute_dtype: fp32, fp64 for fp64 params; a copy
    of the master under master weights, else the param upcast: for an fp32 or fp64
    param the param itself, which the caller must not change before store_param), its
    grad in that dtype times `grad_mul`, and its master or None. States are read with
    `.to(pf.dtype)`."""
    steps = count_steps(state_steps)
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        master = master_params[i] if master_params else None
        cd = compute_dtype(p)
        pf = master.clone() if master is not None else p.to(cd)
        yield i, p, pf, grads[i].to(cd) * grad_mul, master, (steps[i] if steps else None)


def store_param(p: Tensor, pf: Tensor, master: Optional[Tensor], seed: Optional[int],
                tensor_index: int) -> None:
    """Write the result `pf` (fp32, or fp64 for fp64 params) back: into the fp32 master (if any) and the param,
    rounded to nearest, or stochastically for bf16 params under a seed without master."""
    if master is not None:
        master.copy_(pf)
    if seed is not None and master is None and p.dtype == torch.bfloat16:
        p.copy_(bf16_stochastic(pf, sr_tensor_key(seed, tensor_index)))
    else:
        p.copy_(pf)


# --- Adam's maths, shared with LAMB (twins of adam_math.h) -----------------------------


def adam_coeffs(lr: float, step: float, beta1: float, beta2: float, weight_decay: float):
    """adam_math.h adam_coeffs, in double: (lr / (1 - beta1^step),
    1 / sqrt(1 - beta2^step), 1 - lr * weight_decay)."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return lr / bc1, 1.0 / math.sqrt(bc2), decoupled_decay_factor(lr, weight_decay)


def adam_moments(g: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float):
    """adam_math.h adam_moments: the new (m, v), fp32."""
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * (g * g)
    return m, v


def adam_direction(m: Tensor, v_hat: Tensor, step_size: float, inv_bc2_sqrt: float,
                   eps: float) -> Tensor:
    """adam_math.h adam_direction: step_size * m / (sqrt(v_hat) * inv_bc2_sqrt + eps)."""
    return step_size * (m / (v_hat.sqrt() * inv_bc2_sqrt + eps))
