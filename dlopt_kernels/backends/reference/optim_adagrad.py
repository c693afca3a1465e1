"""Pure-torch Adagrad step (the maths of csrc/include/dlopt/adagrad_math.h)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dlopt_kernels.backends.checks import check_elementwise_lists
from dlopt_kernels.backends.reference._common import (each_tensor, grad_multiplier,
                                                      l2_decayed_grad, skip_step, store_param)


def adagrad_step(params, grads, state_sums, master_params, state_steps, lr: Tensor,
                 lr_decay: float, weight_decay: float, eps: float, maximize: bool,
                 grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                 sr_seed: Optional[Tensor]) -> None:
    check_elementwise_lists(params, grads, {"state_sums": state_sums}, master_params,
                            state_steps, sr_seed is not None, op="dlopt::adagrad_step",
                            wide=True)
    if not params or skip_step(found_inf):
        return
    lr_v = float(lr)
    grad_mul = grad_multiplier(maximize, grad_scale)
    seed = int(sr_seed) if sr_seed is not None else None
    with torch.no_grad():
        for i, p, pf, g, master, step in each_tensor(params, grads, master_params,
                                                     state_steps, grad_mul):
            clr = lr_v / (1.0 + (step - 1.0) * lr_decay)
            if weight_decay != 0.0:
                g = l2_decayed_grad(g, pf, weight_decay)
            s = state_sums[i].to(pf.dtype) + g * g
            state_sums[i].copy_(s)
            store_param(p, pf - clr * g / (s.sqrt() + eps), master, seed, i)
