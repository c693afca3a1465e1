"""The Adagrad benchmark: dlopt_kernels.optim.Adagrad against torch.optim.Adagrad
(fused where torch has it, i.e. on the CPU; foreach; for-loop), with lr decay and
weight decay (20 bytes moved per fp32 param: param read + written, grad read, sum read
+ written).

Cases: `common.standard_optimizer_cases` (fp32_10m, gpt2_small, tiny_1000, bf16_10m).
Ours runs on every backend available for the device (plus the reference in quick runs).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from dlopt_kernels.bench import common
from dlopt_kernels.bench.common import Case, Settings

NAME = "optim_adagrad"
HPARAMS = dict(lr=1e-2, lr_decay=1e-4, weight_decay=1e-4, eps=1e-10)

CPU_TARGETS = [
    # (case, ours label pattern, baseline label or None for "% of bandwidth", threshold)
    ("fp32_10m", "dlopt[{b}]", "torch fused", 1.0),
    ("fp32_10m", "dlopt[{b}]", None, 80.0),
    ("gpt2_small", "dlopt[{b}]", "torch fused", 1.0),
    ("gpt2_small", "dlopt[{b}]", None, 80.0),
    ("tiny_1000", "dlopt[{b}]", "torch fused", 1.0),
]


def _ours(backend: str, **kw: Any):
    from dlopt_kernels.optim import Adagrad
    return lambda params: Adagrad(params, **HPARAMS, backend=backend, **kw)


def _fused_supported(device: torch.device) -> bool:
    # torch's fused Adagrad runs CPU tensors only (torch 2.11 and 2.13 refuse CUDA ones)
    try:
        torch.optim.Adagrad([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except RuntimeError:
        return False
    return True


def _baselines(device: torch.device):
    kinds = [("torch foreach", dict(foreach=True)), ("torch for-loop", dict(foreach=False))]
    if _fused_supported(device):
        kinds.insert(0, ("torch fused", dict(fused=True)))
    return {label: (lambda params, kw=kw: torch.optim.Adagrad(params, **HPARAMS, **kw))
            for label, kw in kinds}


def build_cases(device: torch.device, quick: bool) -> tuple[list[Case], list[str], str]:
    backends, auto = common.ours_backends("adagrad_step", device, quick)
    baselines = _baselines(device)
    cases = common.standard_optimizer_cases(_ours, baselines, device, quick, backends, auto,
                                            fastest=next(iter(baselines)))
    return cases, backends, auto


def run(quick: bool = False, device: Optional[torch.device | str] = None, progress: bool = True,
        settings: Optional[Settings] = None) -> dict[str, Any]:
    """Run the benchmark and return its results section (see common.run_benchmark)."""
    return common.run_benchmark(NAME, build_cases, CPU_TARGETS, quick, device, progress,
                                settings, hparams=HPARAMS)
