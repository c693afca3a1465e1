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


def sgd_float64(param: torch.Tensor, grads: list[torch.Tensor], *, lr: float, momentum: float = 0.0,
                dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                maximize: bool = False, buf: torch.Tensor | None = None,
                trace: list | None = None):
    """Apply len(grads) SGD steps (torch.optim.SGD's documented algorithm: the momentum
    buffer starts as the first gradient) to a float64 copy of `param`; `buf` is an
    existing momentum buffer (None: none yet). Returns (param, buffer); `trace`, if
    given, receives the param after every step."""
    p = param.detach().double().clone()
    b = None if buf is None else buf.detach().double().clone()
    for g in grads:
        g = -g.double() if maximize else g.double()
        if weight_decay:
            g = g + weight_decay * p
        if momentum:
            b = g.clone() if b is None else momentum * b + (1 - dampening) * g
            g = g + momentum * b if nesterov else b
        p = p - lr * g
        if trace is not None:
            trace.append(p)
    return p, b


def adagrad_float64(param: torch.Tensor, grads: list[torch.Tensor], *, lr: float,
                    lr_decay: float = 0.0, weight_decay: float = 0.0,
                    initial_accumulator_value: float = 0.0, eps: float = 1e-10,
                    maximize: bool = False, state_sum: torch.Tensor | None = None,
                    step: int = 0, trace: list | None = None):
    """Apply len(grads) Adagrad steps (Duchi et al. 2011, with torch's lr decay
    lr / (1 + (t - 1) * lr_decay)) to a float64 copy of `param`, continuing from
    `state_sum` / `step` if given. Returns (param, state_sum); `trace`, if given,
    receives the param after every step."""
    p = param.detach().double().clone()
    s = (torch.full_like(p, initial_accumulator_value) if state_sum is None
         else state_sum.detach().double().clone())
    for t, g in enumerate(grads, start=step + 1):
        g = -g.double() if maximize else g.double()
        if weight_decay:
            g = g + weight_decay * p
        clr = lr / (1 + (t - 1) * lr_decay)
        s = s + g * g
        p = p - clr * g / (s.sqrt() + eps)
        if trace is not None:
            trace.append(p)
    return p, s


def rmsprop_float64(param: torch.Tensor, grads: list[torch.Tensor], *, lr: float,
                    alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                    momentum: float = 0.0, centered: bool = False, maximize: bool = False,
                    init: tuple | None = None, trace: list | None = None,
                    buf_magnitude: list | None = None):
    """Apply len(grads) RMSprop steps (Hinton's lecture 6e; the centered variant of
    Graves 2013; torch's momentum on the normalized gradient) to a float64 copy of
    `param`, from zero states or from init = (square_avg, grad_avg, momentum_buffer).
    Returns (param, square_avg, grad_avg, momentum_buffer); `trace`, if given, receives
    the param after every step; `buf_magnitude`, if given, receives the momentum
    buffer's terms summed in absolute value (momentum * m + |g / avg|, from |init
    buffer|): the scale any fp32 run's rounding error in the buffer is relative to, as
    its terms can be large and cancel."""
    p = param.detach().double().clone()
    v, ga, b = ((t.detach().double().clone() for t in init) if init is not None
                else (torch.zeros_like(p) for _ in range(3)))
    mag = b.abs()
    for g in grads:
        g = -g.double() if maximize else g.double()
        if weight_decay:
            g = g + weight_decay * p
        v = alpha * v + (1 - alpha) * g * g
        if centered:
            ga = alpha * ga + (1 - alpha) * g
            avg = (v - ga * ga).sqrt() + eps
        else:
            avg = v.sqrt() + eps
        if momentum > 0:
            b = momentum * b + g / avg
            mag = momentum * mag + (g / avg).abs()
            p = p - lr * b
        else:
            p = p - lr * g / avg
        if trace is not None:
            trace.append(p)
    if buf_magnitude is not None:
        buf_magnitude.append(mag)
    return p, v, ga, b


def vector_norms_float64(tensors: list[torch.Tensor], ord: float = 2.0):
    """(per-tensor norms, total) in float64, on the CPU, with torch.linalg.vector_norm;
    the total is vector_norm(norms, ord), as torch.nn.utils.clip_grad_norm_ defines it.
    An empty tensor's norm is the reduction's identity (torch raises for inf / -inf /
    ord < 0)."""
    norms = []
    for t in tensors:
        x = t.detach().double().reshape(-1).cpu()
        if x.numel() == 0:
            norms.append(torch.tensor(0.0 if ord >= 0 else math.inf, dtype=torch.float64))
        else:
            norms.append(torch.linalg.vector_norm(x, ord))
    norms = torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64)
    return norms, torch.linalg.vector_norm(norms, ord)


def lion_float64(param: torch.Tensor, grads: list[torch.Tensor], *, lr: float,
                 betas=(0.9, 0.99), weight_decay: float = 0.0, maximize: bool = False,
                 exp_avg: torch.Tensor | None = None):
    """Apply len(grads) Lion steps (Chen et al. 2023, "Symbolic Discovery of Optimization
    Algorithms", Algorithm 2: c = b1 m + (1 - b1) g; p = p - lr (sign(c) + wd p);
    m = b2 m + (1 - b2) g) to a float64 copy of `param`, from momentum `exp_avg` (zero
    by default). Returns (param, exp_avg, min |c|): sign(c) flips under any rounding
    where |c| is tiny, so callers compare elements whose min |c| is well above it."""
    p = param.detach().double().clone()
    m = torch.zeros_like(p) if exp_avg is None else exp_avg.detach().double().clone()
    min_c = torch.full_like(p, math.inf)
    b1, b2 = betas
    for g in grads:
        g = -g.double() if maximize else g.double()
        c = b1 * m + (1 - b1) * g
        min_c = torch.minimum(min_c, c.abs())
        p = p - lr * (torch.sign(c) + weight_decay * p)
        m = b2 * m + (1 - b2) * g
    return p, m, min_c


class LambFloat64:
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT
    in 76 minutes", Algorithm 2) in float64, from the paper's equations, with NVIDIA
    apex FusedLAMB's global grad-norm clipping. Per step t and tensor:
        g <- g * max_grad_norm / ||all g||   if ||all g|| > max_grad_norm (and set)
        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        r = m_hat / (sqrt(v_hat) + eps)   (m_hat = m / (1 - b1^t), v_hat likewise, or
                                           m, v without bias correction)
        u = r + weight_decay * p
        p <- p - lr * phi(||p||) / ||u|| * u, with phi the identity and the ratio 1
             when either norm is 0.
    `step(grads)` applies one step to float64 copies of the params (self.params).

    `margin[i]` is the smallest |u| / (|r| + |weight_decay * p|) met by tensor i over the
    steps: how close its update came to cancelling. A one-element tensor's step is
    lr * |p| * sign(u), so where that margin is tiny its sign (and the step) depends on
    the rounding of the inputs (tests/tolerances.py LAMB_SIGN_MARGIN)."""

    def __init__(self, params, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 bias_correction=True, max_grad_norm=None, state=None):
        self.params = [p.detach().double().clone() for p in params]
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.bias_correction, self.max_grad_norm = bias_correction, max_grad_norm
        if state is None:
            self.m = [torch.zeros_like(p) for p in self.params]
            self.v = [torch.zeros_like(p) for p in self.params]
            self.t = [0] * len(self.params)
        else:
            self.m = [s["exp_avg"].double().clone() for s in state]
            self.v = [s["exp_avg_sq"].double().clone() for s in state]
            self.t = [int(s["step"]) for s in state]
        self.margin = [math.inf] * len(self.params)

    def step(self, grads, grad_scale: float = 1.0):
        b1, b2 = self.betas
        gs = [g.detach().double() / grad_scale for g in grads]
        if self.max_grad_norm:
            total = math.sqrt(sum(float((g * g).sum()) for g in gs))
            if total > self.max_grad_norm:
                gs = [g * (self.max_grad_norm / total) for g in gs]
        for i, g in enumerate(gs):
            self.t[i] += 1
            t = self.t[i]
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            m_hat, v_hat = self.m[i], self.v[i]
            if self.bias_correction:
                m_hat, v_hat = m_hat / (1 - b1**t), v_hat / (1 - b2**t)
            r = m_hat / (v_hat.sqrt() + self.eps)
            u = r + self.wd * self.params[i]
            if u.numel():
                rel = u.abs() / (r.abs() + (self.wd * self.params[i]).abs() + 1e-300)
                self.margin[i] = min(self.margin[i], float(rel.min()))
            p_norm, u_norm = float(self.params[i].norm()), float(u.norm())
            trust = p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
            self.params[i] = self.params[i] - self.lr * trust * u
        return self.params


def adafactor_float64(param: torch.Tensor, grads: list[torch.Tensor], *, lr: float = 1e-2,
                      beta2_decay: float = -0.8, eps1: float | None = None, eps2: float = 1e-3,
                      d: float = 1.0, weight_decay: float = 0.0, maximize: bool = False,
                      trajectory_scale: bool = False):
    """Apply len(grads) Adafactor steps (Shazeer & Stern 2018, "Adafactor: Adaptive
    Learning Rates with Sublinear Memory Cost", with torch.optim.Adafactor's documented
    choices: beta2_t = 1 - t^beta2_decay, rho_t = min(lr, 1/sqrt(t)), alpha_t =
    max(eps2, RMS(p)) rho_t, decoupled weight decay lr * weight_decay, means (not sums)
    of g^2, eps1 on the variance estimate) to a float64 copy of `param`. Params of 2+
    dims factor the second moment over their last two dims. eps1=None: the machine
    epsilon of param's dtype. Returns (param, row_var, col_var, variance), plus with
    trajectory_scale the elementwise max of |param| over all steps (the magnitude to
    count ulps at); a zero-size param is returned unchanged."""
    p = param.detach().double().clone()
    eps1 = torch.finfo(param.dtype).eps if eps1 is None else eps1
    factored = p.dim() > 1
    shape = tuple(p.shape)
    R = p.new_zeros(shape[:-1] + (1,)) if factored else None
    C = p.new_zeros(shape[:-2] + (1, shape[-1])) if factored else None
    V = None if factored else torch.zeros_like(p)
    scale = p.abs()
    if p.numel() == 0:
        return (p, R, C, V, scale) if trajectory_scale else (p, R, C, V)
    sqrt_n = math.sqrt(p.numel())
    for t, g in enumerate(grads, start=1):
        g = -g.double() if maximize else g.double()
        w = t ** beta2_decay  # 1 - beta2_t
        rho = min(lr, 1 / math.sqrt(t))
        alpha = max(eps2, float(p.norm()) / sqrt_n) * rho
        p = p * (1 - lr * weight_decay)
        if factored:
            R = (1 - w) * R + w * (g * g).mean(dim=-1, keepdim=True)
            C = (1 - w) * C + w * (g * g).mean(dim=-2, keepdim=True)
            v = (R @ C) / R.mean(dim=-2, keepdim=True).clamp(min=eps1)
        else:
            V = (1 - w) * V + w * g * g
            v = V
        u = g / v.clamp(min=eps1 * eps1).sqrt()
        p = p - alpha / max(1.0, float(u.norm()) / (sqrt_n * d)) * u
        scale = torch.maximum(scale, p.abs())
    return (p, R, C, V, scale) if trajectory_scale else (p, R, C, V)
