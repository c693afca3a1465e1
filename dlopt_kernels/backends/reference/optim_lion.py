"""Pure-torch Lion step (the maths of csrc/include/dlopt/lion_math.h)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dlopt_kernels.backends.checks import check_elementwise_lists
from dlopt_kernels.backends.reference._common import (
    decoupled_decay_factor,
    each_tensor,
    grad_multiplier,
    skip_step,
    store_param,
)


def lion_step(params, grads, exp_avgs, master_params, state_steps, lr: Tensor, beta1: float,
              beta2: float, weight_decay: float, maximize: bool, grad_scale: Optional[Tensor],
              found_inf: Optional[Tensor], sr_seed: Optional[Tensor]) -> None:
    check_elementwise_lists(params, grads, {"exp_avgs": exp_avgs}, master_params, state_steps,
                            sr_seed is not None, op="dlopt::lion_step", wide=True)
    if not params or skip_step(found_inf):
        return
    lr_v = float(lr)
    grad_mul = grad_multiplier(maximize, grad_scale)
    decay = decoupled_decay_factor(lr_v, weight_decay)
    seed = int(sr_seed) if sr_seed is not None else None
    with torch.no_grad():
        for i, p, pf, g, master, _ in each_tensor(params, grads, master_params, state_steps,
                                                  grad_mul):
            m = exp_avgs[i].to(pf.dtype)
            if weight_decay != 0.0:
                pf = pf * decay
            u = beta1 * m + (1.0 - beta1) * g
            # lion_math.h sign_of: NaN stays NaN (torch.sign gives 0 there)
            pf = pf - lr_v * torch.where(torch.isnan(u), u, torch.sign(u))
            exp_avgs[i].copy_(beta2 * m + (1.0 - beta2) * g)
            store_param(p, pf, master, seed, i)
