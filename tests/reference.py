"""Float64 oracle for the optimizers, written from the papers' equations and
independent of dlopt_kernels (never test a backend against itself)."""
from __future__ import annotations

import math

import torch


def adam_float64(param: torch.Tensor, grads: list[torch.Tensor], *, lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 maximize: bool = False, decoupled: bool = False) -> torch.Tensor:
    """Apply len(grads) Adam(W) steps to a float64 copy of `param`; returns it."""
    p = param.detach().double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    vmax = torch.zeros_like(p)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if maximize:
            g = -g
        if weight_decay:
            if decoupled:
                p = p * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        v_hat = v
        if amsgrad:
            vmax = torch.maximum(vmax, v)
            v_hat = vmax
        m_hat = m / (1 - b1**t)
        p = p - lr * m_hat / ((v_hat / (1 - b2**t)).sqrt() + eps)
    return p
