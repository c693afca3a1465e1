"""Pure-torch Adafactor step (the maths of csrc/include/dlopt/adafactor_math.h: torch's
Adafactor in fp32 arithmetic, sums of squares in float64)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from dlopt_kernels.backends.checks import check_factored_lists
from dlopt_kernels.backends.reference._common import (
    decoupled_decay_factor,
    grad_multiplier,
    skip_step,
    store_param,
)


def adafactor_coeffs(lr: float, step: float, beta2_decay: float, weight_decay: float):
    """adafactor_math.h adafactor_coeffs: (lerp weight as fp32, rho, decay factor)."""
    w = float(torch.tensor(step**beta2_decay, dtype=torch.float32))
    return w, min(lr, 1.0 / math.sqrt(step)), decoupled_decay_factor(lr, weight_decay)


def adafactor_step_size(sum_p2: float, sum_u2: float, numel: int, eps2: float, rho: float,
                        d: float) -> float:
    """adafactor_math.h adafactor_step_size, rounded to fp32 as the kernels use it."""
    sqrt_n = math.sqrt(numel)
    rms_p, rms_u = math.sqrt(sum_p2) / sqrt_n, math.sqrt(sum_u2) / (sqrt_n * d)
    alpha = (eps2 if math.isnan(rms_p) else max(eps2, rms_p)) * rho
    denom = 1.0 if math.isnan(rms_u) else max(1.0, rms_u)
    return float(torch.tensor(alpha / denom, dtype=torch.float32))


def adafactor_step(params, grads, row_vars, col_vars, variances, master_params, state_steps,
                   lr: Tensor, beta2_decay: float, eps1: float, eps2: float, d: float,
                   weight_decay: float, maximize: bool, grad_scale: Optional[Tensor],
                   found_inf: Optional[Tensor], sr_seed: Optional[Tensor]) -> None:
    check_factored_lists(params, grads, row_vars, col_vars, variances, master_params,
                         state_steps, sr_seed is not None)
    if not params or skip_step(found_inf):
        return
    lr_v = float(lr)
    grad_mul = grad_multiplier(maximize, grad_scale)
    seed = int(sr_seed) if sr_seed is not None else None
    eps1_sq = eps1 * eps1
    kf = kv = 0
    with torch.no_grad():
        for i, p in enumerate(params):
            state_steps[i].add_(1)
            factored = p.dim() >= 2
            if factored:
                rv, cv = row_vars[kf], col_vars[kf]
                kf += 1
            else:
                var = variances[kv]
                kv += 1
            if p.numel() == 0:  # nothing to update (torch divides by zero here)
                continue
            w, rho, decay = adafactor_coeffs(lr_v, float(state_steps[i]), beta2_decay,
                                             weight_decay)
            master = master_params[i] if master_params else None
            pf = master.clone() if master is not None else p.float()
            g = grads[i].float() * grad_mul
            sum_p2 = float(pf.double().square().sum())
            if factored:
                rows, cols = p.shape[-2], p.shape[-1]
                g2 = g.double().square()
                rv.copy_(torch.lerp(rv.float(), (g2.sum(-1, keepdim=True) / cols).float(), w))
                cv.copy_(torch.lerp(cv.float(), (g2.sum(-2, keepdim=True) / rows).float(), w))
                rvf, cvf = rv.float(), cv.float()
                den = (rvf.double().sum(-2, keepdim=True) / rows).float().clamp(min=eps1)
                v = (rvf * cvf) / den
            else:
                var.copy_(torch.lerp(var.float(), g * g, w))
                v = var.float()
            u = g * (1.0 / v.clamp(min=eps1_sq).sqrt())
            step_size = adafactor_step_size(sum_p2, float(u.double().square().sum()), p.numel(),
                                            eps2, rho, d)
            if weight_decay != 0.0:
                pf = pf * decay
            store_param(p, pf - step_size * u, master, seed, i)
