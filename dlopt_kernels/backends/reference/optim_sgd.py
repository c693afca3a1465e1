"""Pure-torch SGD step (the maths of csrc/include/dlopt/sgd_math.h)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dlopt_kernels.backends.checks import check_sgd_lists
from dlopt_kernels.backends.reference._common import (each_tensor, grad_multiplier,
                                                      l2_decayed_grad, skip_step, store_param)


def sgd_step(params, grads, momentum_buffers, master_params, lr: Tensor, weight_decay: float,
             momentum: float, dampening: float, nesterov: bool, maximize: bool,
             new_buffers: list[bool], grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
             sr_seed: Optional[Tensor]) -> None:
    check_sgd_lists(params, grads, momentum_buffers, master_params, momentum, new_buffers,
                    sr_seed is not None)
    if not params or skip_step(found_inf):
        return
    lr_v = float(lr)
    grad_mul = grad_multiplier(maximize, grad_scale)
    seed = int(sr_seed) if sr_seed is not None else None
    with torch.no_grad():
        for i, p, pf, g, master, _ in each_tensor(params, grads, master_params, [], grad_mul):
            if weight_decay != 0.0:
                g = l2_decayed_grad(g, pf, weight_decay)
            if momentum != 0.0:
                buf = momentum_buffers[i]
                if new_buffers and new_buffers[i]:
                    b = g
                else:
                    b = momentum * buf.to(pf.dtype) + (1.0 - dampening) * g
                buf.copy_(b)
                g = g + momentum * b if nesterov else b
            store_param(p, pf - lr_v * g, master, seed, i)
