"""The RMSprop benchmark: dlopt_kernels.optim.RMSprop against torch.optim.RMSprop
(foreach, for-loop; torch has no fused RMSprop), with momentum and weight decay (28
bytes moved per fp32 param: param read + written, grad read, square_avg and momentum
buffer read + written).

Cases: `common.standard_optimizer_cases` (fp32_10m, gpt2_small, tiny_1000, bf16_10m),
plus ``fp32_10m_centered``: one 10M-element tensor with centered=True (36 bytes per param).
Ours runs on every backend available for the device (plus the reference in quick runs).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from dlopt_kernels.bench import common
from dlopt_kernels.bench.common import Case, Settings

NAME = "optim_rmsprop"
HPARAMS = dict(lr=1e-3, alpha=0.99, eps=1e-8, momentum=0.9, weight_decay=1e-4)

CPU_TARGETS = [
    # (case, ours label pattern, baseline label or None for "% of bandwidth", threshold);
    # torch has no fused RMSprop: foreach is its fastest path
    ("fp32_10m", "dlopt[{b}]", "torch foreach", 1.0),
    ("fp32_10m", "dlopt[{b}]", None, 80.0),
    ("fp32_10m_centered", "dlopt[{b}]", "torch foreach", 1.0),
    ("fp32_10m_centered", "dlopt[{b}]", None, 80.0),
    ("gpt2_small", "dlopt[{b}]", "torch foreach", 1.0),
    ("gpt2_small", "dlopt[{b}]", None, 80.0),
    ("tiny_1000", "dlopt[{b}]", "torch foreach", 1.0),
]


def _ours(backend: str, hparams=HPARAMS, **kw: Any):
    from dlopt_kernels.optim import RMSprop
    return lambda params: RMSprop(params, **hparams, backend=backend, **kw)


def _baselines(hparams=HPARAMS):
    return {label: (lambda params, kw=kw: torch.optim.RMSprop(params, **hparams, **kw))
            for label, kw in (("torch foreach", dict(foreach=True)),
                              ("torch for-loop", dict(foreach=False)))}


def build_cases(device: torch.device, quick: bool) -> tuple[list[Case], list[str], str]:
    backends, auto = common.ours_backends("rmsprop_step", device, quick)
    cases = common.standard_optimizer_cases(_ours, _baselines(), device, quick, backends, auto,
                                            fastest="torch foreach")
    n = 50_000 if quick else 10_000_000
    centered = dict(HPARAMS, centered=True)
    cases.insert(1, common.fp32_case("fp32_10m_centered", f"one {n:,}-element fp32 tensor, "
                                     "centered", [(n,)], lambda b: _ours(b, centered),
                                     _baselines(centered), device, backends, auto))
    return cases, backends, auto


def run(quick: bool = False, device: Optional[torch.device | str] = None, progress: bool = True,
        settings: Optional[Settings] = None) -> dict[str, Any]:
    """Run the benchmark and return its results section (see common.run_benchmark)."""
    return common.run_benchmark(NAME, build_cases, CPU_TARGETS, quick, device, progress,
                                settings, hparams=HPARAMS)
