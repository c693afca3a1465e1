"""Pure-torch Adam/AdamW step (the maths of csrc/include/dlopt/adam_math.h)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dlopt_kernels.backends.checks import check_elementwise_lists
from dlopt_kernels.backends.reference._common import (adam_coeffs, adam_direction, adam_moments,
                                                      each_tensor, l2_decayed_grad, store_param)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
              state_steps, lr: Tensor, beta1: float, beta2: float, weight_decay: float,
              eps: float, amsgrad: bool, maximize: bool, decoupled_weight_decay: bool,
              grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
              sr_seed: Optional[Tensor]) -> None:
    if not params:
        return
    states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        states["max_exp_avg_sqs"] = max_exp_avg_sqs
    # refuse a malformed call before anything is written (steps included)
    check_elementwise_lists(params, grads, states, master_params, state_steps,
                            sr_seed is not None, op="dlopt::adam_step", wide=True)
    if found_inf is not None and float(found_inf) != 0.0:
        return
    lr_v = float(lr)
    grad_mul = (-1.0 if maximize else 1.0) / (float(grad_scale) if grad_scale is not None else 1.0)
    seed = int(sr_seed) if sr_seed is not None else None
    with torch.no_grad():
        for i, p, pf, g, master, step in each_tensor(params, grads, master_params,
                                                     state_steps, grad_mul):
            step_size, inv_bc2_sqrt, decay = adam_coeffs(lr_v, step, beta1, beta2, weight_decay)
            m = exp_avgs[i].to(pf.dtype)
            v = exp_avg_sqs[i].to(pf.dtype)
            if weight_decay != 0.0:
                if decoupled_weight_decay:
                    pf = pf * decay
                else:
                    g = l2_decayed_grad(g, pf, weight_decay)
            m, v = adam_moments(g, m, v, beta1, beta2)
            v_hat = v
            if amsgrad:
                vmax = torch.maximum(max_exp_avg_sqs[i].to(pf.dtype), v)
                max_exp_avg_sqs[i].copy_(vmax)
                v_hat = vmax
            pf = pf - adam_direction(m, v_hat, step_size, inv_bc2_sqrt, eps)
            exp_avgs[i].copy_(m)
            exp_avg_sqs[i].copy_(v)
            store_param(p, pf, master, seed, i)
