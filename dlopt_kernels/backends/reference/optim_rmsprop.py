"""Pure-torch RMSprop step (the maths of csrc/include/dlopt/rmsprop_math.h, in the op
order of torch.optim.RMSprop's for-loop path)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dlopt_kernels.backends.checks import check_rmsprop_lists
from dlopt_kernels.backends.reference._common import (each_tensor, grad_multiplier,
                                                      l2_decayed_grad, skip_step, store_param)


def rmsprop_step(params, grads, square_avgs, grad_avgs, momentum_buffers, master_params,
                 state_steps, lr: Tensor, alpha: float, eps: float, weight_decay: float,
                 momentum: float, centered: bool, maximize: bool, grad_scale: Optional[Tensor],
                 found_inf: Optional[Tensor], sr_seed: Optional[Tensor]) -> None:
    check_rmsprop_lists(params, grads, square_avgs, grad_avgs, momentum_buffers, master_params,
                        state_steps, momentum, centered, sr_seed is not None)
    if not params or skip_step(found_inf):
        return
    lr_v = float(lr)
    grad_mul = grad_multiplier(maximize, grad_scale)
    seed = int(sr_seed) if sr_seed is not None else None
    with torch.no_grad():
        for i, p, pf, g, master, _ in each_tensor(params, grads, master_params, state_steps,
                                                  grad_mul):
            # torch.optim.RMSprop's own op sequence (for-loop path), so that on any
            # device this backend rounds as torch does: centered RMSprop's v - ga^2
            # cancels and amplifies any other order's rounding along the trajectory.
            if weight_decay != 0.0:
                g = l2_decayed_grad(g, pf, weight_decay)
            v = square_avgs[i].to(pf.dtype)
            v.mul_(alpha).addcmul_(g, g, value=1.0 - alpha)
            square_avgs[i].copy_(v)
            if centered:
                ga = grad_avgs[i].to(pf.dtype)
                ga.lerp_(g, 1.0 - alpha)
                grad_avgs[i].copy_(ga)
                avg = v.addcmul(ga, ga, value=-1).sqrt_()
            else:
                avg = v.sqrt()
            avg.add_(eps)
            if momentum > 0.0:
                b = momentum_buffers[i].to(pf.dtype)
                b.mul_(momentum).addcdiv_(g, avg)
                momentum_buffers[i].copy_(b)
                pf.add_(b, alpha=-lr_v)
            else:
                pf.addcdiv_(g, avg, value=-lr_v)
            store_param(p, pf, master, seed, i)
