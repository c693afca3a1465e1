"""The LAMB benchmark: dlopt_kernels.optim.LAMB against plain torch implementations of
LAMB (there is no torch.optim.LAMB): ``torch foreach`` (every line of the step one
torch._foreach_* call over all tensors, the per-tensor norms from torch._foreach_norm,
the trust ratios as one stacked tensor op) and ``torch for-loop`` (the same ops per
tensor). Same maths as ours: apex-style global grad-norm clipping (max_grad_norm=1.0,
apex's default), bias correction, weight decay added to the update, trust ratio
||p|| / ||u|| (1 when either is 0).

Bytes: the harness counts the least an element-wise step moves (fp32: 28 B/param). LAMB
cannot be one pass (every element's update needs its tensor's ||u|| first): ours moves
40 B/param (pass 1: read p, g, m, v, write m, v; pass 2: read p, m, v, write p) plus 4
for the global grad norm, so its "% BW" tops out near 64%.

Cases: `common.standard_optimizer_cases` (fp32_10m, gpt2_small, tiny_1000, bf16_10m) and
``fp64_gpt2`` (`common.fp64_case`: the GPT-2 shapes in float64, ours under
backend='auto', for information).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from dlopt_kernels.bench import common
from dlopt_kernels.bench.common import Case, Settings

NAME = "optim_lamb"
HPARAMS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0)

CPU_TARGETS = [
    # (case, ours label pattern, baseline label or None for "% of bandwidth", threshold)
    ("fp32_10m", "dlopt[{b}]", "torch foreach", 3.0),
    ("gpt2_small", "dlopt[{b}]", "torch foreach", 3.0),
    ("tiny_1000", "dlopt[{b}]", "torch foreach", 3.0),
]


class TorchLAMB(torch.optim.Optimizer):
    """LAMB in plain torch ops: the baseline (foreach=True: torch._foreach_* over all
    tensors; False: a loop over tensors)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 max_grad_norm=None, foreach: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm, foreach=foreach))

    @torch.no_grad()
    def step(self) -> None:
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
            groups.append((group, params, [p.grad for p in params]))
        max_norm = self.defaults["max_grad_norm"]
        clip = None
        if max_norm:
            norms = [n for _, _, gs in groups for n in torch._foreach_norm(gs)]
            total = torch.linalg.vector_norm(torch.stack(norms))
            clip = torch.where(total > max_norm, max_norm / total, 1.0)
        for group, params, grads in groups:
            if not params:
                continue
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            ms = [self.state[p]["exp_avg"] for p in params]
            vs = [self.state[p]["exp_avg_sq"] for p in params]
            self.state[params[0]]["step"] += 1
            t = self.state[params[0]]["step"]
            for p in params[1:]:
                self.state[p]["step"] = t
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            if group["foreach"]:
                if clip is not None:
                    grads = torch._foreach_mul(grads, clip)
                torch._foreach_lerp_(ms, grads, 1 - b1)
                torch._foreach_mul_(vs, b2)
                torch._foreach_addcmul_(vs, grads, grads, 1 - b2)
                denom = torch._foreach_sqrt(vs)
                torch._foreach_div_(denom, math.sqrt(bc2))
                torch._foreach_add_(denom, eps)
                updates = torch._foreach_div(ms, denom)
                torch._foreach_div_(updates, bc1)
                if wd != 0:
                    torch._foreach_add_(updates, params, alpha=wd)
                pn = torch.stack(torch._foreach_norm(params))
                un = torch.stack(torch._foreach_norm(updates))
                trust = torch.where((pn > 0) & (un > 0), pn / un, 1.0)
                torch._foreach_mul_(updates, list((-lr * trust).unbind()))
                torch._foreach_add_(params, updates)
            else:
                for p, g, m, v in zip(params, grads, ms, vs):
                    if clip is not None:
                        g = g * clip
                    m.lerp_(g, 1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    u = (m / bc1).div_(v.sqrt().div_(math.sqrt(bc2)).add_(eps))
                    if wd != 0:
                        u.add_(p, alpha=wd)
                    pn, un = p.norm(), u.norm()
                    trust = torch.where((pn > 0) & (un > 0), pn / un, 1.0)
                    p.sub_(u.mul_(lr * trust))


def _ours(backend: str, **kw: Any):
    from dlopt_kernels.optim import LAMB
    return lambda params: LAMB(params, **HPARAMS, backend=backend, **kw)


def _baselines():
    return {label: (lambda params, fe=fe: TorchLAMB(params, **HPARAMS, foreach=fe))
            for label, fe in (("torch foreach", True), ("torch for-loop", False))}


def build_cases(device: torch.device, quick: bool) -> tuple[list[Case], list[str], str]:
    backends, auto = common.ours_backends("lamb_step", device, quick)
    cases = common.standard_optimizer_cases(_ours, _baselines(), device, quick, backends, auto,
                                            fastest="torch foreach")
    cases.append(common.fp64_case("lamb_step", _ours, _baselines(), device, quick))
    return cases, backends, auto


def run(quick: bool = False, device: Optional[torch.device | str] = None, progress: bool = True,
        settings: Optional[Settings] = None) -> dict[str, Any]:
    """Run the benchmark and return its results section (see common.run_benchmark)."""
    return common.run_benchmark(NAME, build_cases, CPU_TARGETS, quick, device, progress,
                                settings, hparams=HPARAMS,
                                baseline_impl="dlopt_kernels.bench.optim_lamb.TorchLAMB")
