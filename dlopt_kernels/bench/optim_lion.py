"""The Lion benchmark: dlopt_kernels.optim.Lion against plain torch implementations of
Lion (there is no torch.optim.Lion): ``torch foreach`` (the whole step in torch._foreach_*
ops, lerp for both interpolations: 5 passes over memory) and ``torch for-loop`` (the
same ops per tensor, as lucidrains/lion-pytorch writes it). fp32 Lion moves 20 bytes per
param (param read + written, grad read, exp_avg read + written).

Cases: `common.standard_optimizer_cases` (fp32_10m, gpt2_small, tiny_1000, bf16_10m).
Ours runs on every backend available for the device (plus the reference in quick runs).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from dlopt_kernels.bench import common
from dlopt_kernels.bench.common import Case, Settings

NAME = "optim_lion"
HPARAMS = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)

CPU_TARGETS = [
    # (case, ours label pattern, baseline label or None for "% of bandwidth", threshold)
    ("fp32_10m", "dlopt[{b}]", "torch foreach", 3.0),
    ("fp32_10m", "dlopt[{b}]", None, 80.0),
    ("gpt2_small", "dlopt[{b}]", "torch foreach", 3.0),
    ("gpt2_small", "dlopt[{b}]", None, 80.0),
    ("tiny_1000", "dlopt[{b}]", "torch foreach", 3.0),
]


class TorchLion(torch.optim.Optimizer):
    """Lion in plain torch ops: the baseline. foreach=True runs each line of the step as
    one torch._foreach_* call over all tensors; foreach=False loops over tensors."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 foreach: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      foreach=foreach))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            ms = [self.state[p].setdefault("exp_avg", torch.zeros_like(p)) for p in params]
            lr, wd = group["lr"], group["weight_decay"]
            b1, b2 = group["betas"]
            if group["foreach"]:
                if wd != 0:
                    torch._foreach_mul_(params, 1 - lr * wd)
                update = torch._foreach_lerp(ms, grads, 1 - b1)
                torch._foreach_sign_(update)
                torch._foreach_add_(params, update, alpha=-lr)
                torch._foreach_lerp_(ms, grads, 1 - b2)
            else:
                for p, g, m in zip(params, grads, ms):
                    p.mul_(1 - lr * wd)
                    p.add_(m.mul(b1).add_(g, alpha=1 - b1).sign_(), alpha=-lr)
                    m.mul_(b2).add_(g, alpha=1 - b2)


def _ours(backend: str, **kw: Any):
    from dlopt_kernels.optim import Lion
    return lambda params: Lion(params, **HPARAMS, backend=backend, **kw)


def _baselines():
    return {label: (lambda params, fe=fe: TorchLion(params, **HPARAMS, foreach=fe))
            for label, fe in (("torch foreach", True), ("torch for-loop", False))}


def build_cases(device: torch.device, quick: bool) -> tuple[list[Case], list[str], str]:
    backends, auto = common.ours_backends("lion_step", device, quick)
    cases = common.standard_optimizer_cases(_ours, _baselines(), device, quick, backends, auto,
                                            fastest="torch foreach")
    return cases, backends, auto


def run(quick: bool = False, device: Optional[torch.device | str] = None, progress: bool = True,
        settings: Optional[Settings] = None) -> dict[str, Any]:
    """Run the benchmark and return its results section (see common.run_benchmark)."""
    return common.run_benchmark(NAME, build_cases, CPU_TARGETS, quick, device, progress,
                                settings, hparams=HPARAMS,
                                baseline_impl="dlopt_kernels.bench.optim_lion.TorchLion")
