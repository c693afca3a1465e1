"""Pure-torch LAMB step (the maths of csrc/include/dlopt/lamb_math.h): fp32 per
element (fp64 for fp64 params), norms and the trust ratio in float64, no host sync beyond reading the step
count (as the Adam reference does)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from dlopt_kernels.backends.checks import check_elementwise_lists
from dlopt_kernels.backends.reference._common import (adam_coeffs, adam_direction, adam_moments,
                                                      compute_dtype, count_steps, grad_multiplier,
                                                      l2_decayed_grad, skip_step, store_param)


def lamb_clip_factor(global_norm: float, max_norm: float) -> float:
    """lamb_math.h: max_norm / global_norm if global_norm > max_norm > 0, else 1."""
    return max_norm / global_norm if (max_norm > 0.0 and global_norm > max_norm) else 1.0


def lamb_step(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, lr: Tensor,
              beta1: float, beta2: float, weight_decay: float, eps: float,
              bias_correction: bool, max_grad_norm: float, global_grad_norm: Optional[Tensor],
              grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
              sr_seed: Optional[Tensor], *,
              whole_sums: Optional[Callable[[Tensor], Tensor]] = None) -> None:
    """`whole_sums` (for sharded tensors, ops/_dtensor.py): maps the (len(params), 2)
    float64 sums of squares of each local param and update to those of the whole
    tensors; the trust ratios come from its result."""
    if not params:
        return
    check_elementwise_lists(params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
                            master_params, state_steps, sr_seed is not None,
                            op="dlopt::lamb_step", wide=True)
    if max_grad_norm > 0.0 and global_grad_norm is None:
        raise ValueError("dlopt::lamb_step: max_grad_norm > 0 needs global_grad_norm")
    if skip_step(found_inf):
        return
    unscale = grad_multiplier(False, grad_scale)
    clip = (lamb_clip_factor(float(global_grad_norm) * unscale, max_grad_norm)
            if max_grad_norm > 0.0 else 1.0)
    grad_mul = unscale * clip
    seed = int(sr_seed) if sr_seed is not None else None
    with torch.no_grad():
        # pass 1: moments, update directions and their sums of squares
        updates = []
        sums = torch.zeros(len(params), 2, dtype=torch.float64, device=params[0].device)
        steps = count_steps(state_steps)
        for i, p in enumerate(params):
            if bias_correction:
                step_size, inv_bc2_sqrt, _ = adam_coeffs(1.0, steps[i], beta1, beta2,
                                                         weight_decay)
            else:
                step_size, inv_bc2_sqrt = 1.0, 1.0
            master = master_params[i] if master_params else None
            cd = compute_dtype(p)  # fp32, or fp64 for fp64 params
            pf = master.clone() if master is not None else p.to(cd)
            g = grads[i].to(cd) * grad_mul
            m, v = adam_moments(g, exp_avgs[i].to(cd), exp_avg_sqs[i].to(cd), beta1, beta2)
            exp_avgs[i].copy_(m)
            exp_avg_sqs[i].copy_(v)
            # the update direction from the moments as stored (rounded if low precision)
            u = adam_direction(exp_avgs[i].to(cd), exp_avg_sqs[i].to(cd), step_size,
                               inv_bc2_sqrt, eps)
            if weight_decay != 0.0:
                u = l2_decayed_grad(u, pf, weight_decay)
            sums[i, 0] = pf.double().square().sum()
            sums[i, 1] = u.double().square().sum()
            updates.append((pf, u, master))
        if whole_sums is not None:
            sums = whole_sums(sums)
        # pass 2: the trust ratios and the update
        lr_v = float(lr)
        for i, (p, (pf, u, master)) in enumerate(zip(params, updates)):
            if p.numel() == 0:
                continue
            p_norm, u_norm = sums[i].sqrt().unbind()
            trust = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, 1.0)
            store_param(p, pf - (lr_v * trust).to(pf.dtype) * u, master, seed, i)
