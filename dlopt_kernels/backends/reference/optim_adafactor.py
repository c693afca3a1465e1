"""Pure-torch Adafactor step (the maths of csrc/include/dlopt/adafactor_math.h: torch's
Adafactor in fp32 arithmetic, or fp64 for fp64 params, sums of squares in float64)."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from dlopt_kernels.backends.checks import check_factored_lists
from dlopt_kernels.backends.reference._common import (
    compute_dtype,
    count_steps,
    decoupled_decay_factor,
    grad_multiplier,
    rounded,
    skip_step,
    store_param,
)


def adafactor_coeffs(lr: float, step: float, beta2_decay: float, weight_decay: float,
                     dtype: torch.dtype = torch.float32):
    """adafactor_math.h adafactor_coeffs: (lerp weight in the arithmetic's `dtype`, rho,
    decay factor)."""
    w = rounded(step**beta2_decay, dtype)
    return w, min(lr, 1.0 / math.sqrt(step)), decoupled_decay_factor(lr, weight_decay)


def adafactor_step_size(sum_p2: float, sum_u2: float, numel: int, eps2: float, rho: float,
                        d: float, dtype: torch.dtype = torch.float32) -> float:
    """adafactor_math.h adafactor_step_size, rounded to the arithmetic's `dtype` (fp32 as
    the kernels use it)."""
    sqrt_n = math.sqrt(numel)
    rms_p, rms_u = math.sqrt(sum_p2) / sqrt_n, math.sqrt(sum_u2) / (sqrt_n * d)
    alpha = (eps2 if math.isnan(rms_p) else max(eps2, rms_p)) * rho
    denom = 1.0 if math.isnan(rms_u) else max(1.0, rms_u)
    return rounded(alpha / denom, dtype)


class LocalBlock(NamedTuple):
    """Where a param's local tensor sits in the whole one (ops/_dtensor.py, FSDP2):
    the whole shape, the local block's offset in it, and `reduce(t)`, which sums a
    float64 tensor in place over the ranks holding the other blocks."""
    shape: tuple
    offset: tuple
    reduce: Callable[[Tensor], None]


def _whole_sums(part: Tensor, dim: int, shard: LocalBlock, local_shape) -> Tensor:
    """Sums of g^2 along `dim` (-1: a row's, -2: a column's) of the whole tensor, from
    `part`, this block's sums (kept dims): placed at the block's offset in zeros of
    the whole shape (the summed dim 1) and summed over the ranks."""
    shape = list(shard.shape)
    shape[dim] = 1
    whole = part.new_zeros(shape)
    at = [slice(o, o + n) for o, n in zip(shard.offset, local_shape)]
    at[dim] = slice(0, 1)
    whole[tuple(at)] = part
    shard.reduce(whole)
    return whole


def adafactor_step(params, grads, row_vars, col_vars, variances, master_params, state_steps,
                   lr: Tensor, beta2_decay: float, eps1: float, eps2: float, d: float,
                   weight_decay: float, maximize: bool, grad_scale: Optional[Tensor],
                   found_inf: Optional[Tensor], sr_seed: Optional[Tensor],
                   shards: Optional[list] = None) -> None:
    """`shards` (ops/_dtensor.py, for DTensor params): one `LocalBlock` or None per param;
    the params, grads, variances and masters are then each rank's local blocks and the
    row / column variances whole (replicated) tensors, and the sums behind them and
    behind each step size are summed over the ranks (every rank makes the same
    collective calls, in param order, also for an empty block)."""
    if shards is None:  # (the DTensor rule checks the whole tensors before)
        check_factored_lists(params, grads, row_vars, col_vars, variances, master_params,
                             state_steps, sr_seed is not None, wide=True)
    if not params or skip_step(found_inf):
        return
    lr_v = float(lr)
    grad_mul = grad_multiplier(maximize, grad_scale)
    seed = int(sr_seed) if sr_seed is not None else None
    eps1_sq = eps1 * eps1
    kf = kv = 0
    with torch.no_grad():
        steps = count_steps(state_steps)
        for i, p in enumerate(params):
            factored = p.dim() >= 2
            if factored:
                rv, cv = row_vars[kf], col_vars[kf]
                kf += 1
            else:
                var = variances[kv]
                kv += 1
            shard = shards[i] if shards is not None else None
            shape = shard.shape if shard is not None else tuple(p.shape)
            numel = math.prod(shape)
            if numel == 0:  # nothing to update (torch divides by zero here)
                continue
            cd = compute_dtype(p)  # fp32, or fp64 for fp64 params
            w, rho, decay = adafactor_coeffs(lr_v, steps[i], beta2_decay, weight_decay, cd)
            master = master_params[i] if master_params else None
            pf = master.clone() if master is not None else p.to(cd)
            g = grads[i].to(cd) * grad_mul
            sum_p2 = pf.double().square().sum()
            if factored:
                rows, cols = shape[-2], shape[-1]
                g2 = g.double().square()
                row_sums, col_sums = g2.sum(-1, keepdim=True), g2.sum(-2, keepdim=True)
                if shard is not None:
                    row_sums = _whole_sums(row_sums, -1, shard, p.shape)
                    col_sums = _whole_sums(col_sums, -2, shard, p.shape)
                rv.copy_(torch.lerp(rv.to(cd), (row_sums / cols).to(cd), w))
                cv.copy_(torch.lerp(cv.to(cd), (col_sums / rows).to(cd), w))
                rvf, cvf = rv.to(cd), cv.to(cd)
                den = (rvf.double().sum(-2, keepdim=True) / rows).to(cd).clamp(min=eps1)
                if shard is not None:  # this block's rows, columns and batch entries
                    at = [slice(o, o + n) for o, n in zip(shard.offset, p.shape)]
                    batch = tuple(at[:-2])
                    rvf = rvf[batch + (at[-2], slice(None))]
                    cvf = cvf[batch + (slice(None), at[-1])]
                    den = den[batch]
                v = (rvf * cvf) / den
            else:
                var.copy_(torch.lerp(var.to(cd), g * g, w))
                v = var.to(cd)
            u = g * (1.0 / v.clamp(min=eps1_sq).sqrt())
            sums = torch.stack([sum_p2, u.double().square().sum()])
            if shard is not None:
                shard.reduce(sums)
            step_size = adafactor_step_size(float(sums[0]), float(sums[1]), numel, eps2, rho, d,
                                            cd)
            if weight_decay != 0.0:
                pf = pf * decay
            store_param(p, pf - step_size * u, master, seed, i)
