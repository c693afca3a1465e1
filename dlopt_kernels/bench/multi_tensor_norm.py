"""The clip_grad_norm benchmark: dlopt_kernels.optim.clip_grad_norm_ (the norm from one
fused `multi_tensor_norm` call per device; the scaling by one multi-tensor kernel on the
CPU, torch._foreach_mul_ elsewhere) against
torch.nn.utils.clip_grad_norm_ with foreach=True (torch._foreach_norm per (device, dtype)
group, then a stack and a vector_norm) and foreach=False (a norm per tensor). A diagnostic
row times the norm op alone.

A clip reads every grad for the norm, then reads and writes it to scale it: 12 B per fp32
grad element (6 for bf16). Each implementation clips its own copy of the grads; after
the first call they sit at max_norm, the coefficient is ~1, and the scaling still runs
(torch does not branch on the value: that would sync).

Cases: ``fp32_10m`` (one tensor), ``gpt2_small`` (148 GPT-2 small shapes, x 1/3 on the
CPU), ``tiny_1000`` (1,000 tensors of 1K-4K elements: per-call overhead), ``bf16_gpt2``
(bf16 grads, GPT-2 shapes).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from dlopt_kernels.bench import common
from dlopt_kernels.bench.common import Case, Impl, Runner, Settings

NAME = "clip_grad_norm"
MAX_NORM = 1.0

CPU_TARGETS = [
    ("fp32_10m", "dlopt[{b}]", "torch foreach", 1.0),
    ("fp32_10m", "dlopt[{b}]", None, 80.0),
    ("gpt2_small", "dlopt[{b}]", "torch foreach", 1.0),
    ("gpt2_small", "dlopt[{b}]", None, 80.0),
    ("tiny_1000", "dlopt[{b}]", "torch foreach", 1.0),
]


class ClipRunner(Runner):
    """Times `fn(params)` on params of its own (grads set by common.make_params)."""

    def __init__(self, fn: Callable[[list], Any], shapes, dtype, device, describe: str) -> None:
        self.params = common.make_params(shapes, dtype, device)
        self.grads = [p.grad for p in self.params]
        self.fn = fn
        self.numel = sum(p.numel() for p in self.params)
        self._describe = describe

    def step(self) -> Any:
        return self.fn(self.params)

    def bytes_per_param(self) -> float:
        return 3.0 * self.params[0].element_size()  # read (norm) + read and write (scale)

    def describe(self) -> dict[str, Any]:
        return {"function": self._describe,
                "param_dtype": str(self.params[0].dtype).replace("torch.", "")}


class NormOnlyRunner(ClipRunner):
    def bytes_per_param(self) -> float:
        return float(self.params[0].element_size())  # one read


def _impls(shapes, dtype, device, backends, auto) -> list[Impl]:
    from dlopt_kernels.optim import clip_grad_norm_

    def ours(b):
        return lambda ps: clip_grad_norm_(ps, MAX_NORM, backend=b)

    def torch_clip(fe):
        return lambda ps: torch.nn.utils.clip_grad_norm_(ps, MAX_NORM, foreach=fe)

    impls = [Impl(f"dlopt[{b}]", "ours",
                  lambda b=b: ClipRunner(ours(b), shapes, dtype, device,
                                         "dlopt_kernels.optim.clip_grad_norm_"),
                  note="backend='auto' picks this" if b == auto else "")
             for b in backends]
    for label, fe in (("torch foreach", True), ("torch for-loop", False)):
        what = f"torch.nn.utils.clip_grad_norm_(foreach={fe})"
        impls.append(Impl(label, "baseline",
                          lambda fe=fe, what=what: ClipRunner(torch_clip(fe), shapes, dtype,
                                                              device, what)))
    norm = torch.ops.dlopt.multi_tensor_norm
    impls.append(Impl(f"dlopt[{auto}] norm op only", "diag",
                      lambda: NormOnlyRunner(lambda ps: norm([p.grad for p in ps], 2.0, auto),
                                             shapes, dtype, device, "multi_tensor_norm"),
                      note="torch.ops.dlopt.multi_tensor_norm alone (bytes: one read)"))
    return impls


def build_cases(device: torch.device, quick: bool) -> tuple[list[Case], list[str], str]:
    backends, auto = common.ours_backends("multi_tensor_norm", device, quick)
    cuda = device.type == "cuda"
    f32 = torch.float32
    cases = []
    n = 50_000 if quick else 10_000_000
    cases.append(Case("fp32_10m", f"one {n:,}-element fp32 grad", n, 1,
                      _impls([(n,)], f32, device, backends, auto)))
    width = (1 / 48) if quick else (1.0 if cuda else 1 / 3)
    shapes = common.gpt2_small_shapes(width)
    cases.append(Case("gpt2_small", f"GPT-2 small shapes x {width:.4g} (fp32 grads)",
                      common.numel_of(shapes), len(shapes),
                      _impls(shapes, f32, device, backends, auto),
                      info={"width": width}))
    count = 30 if quick else 1000
    tiny = common.random_sizes(count, 1024, 4096, seed=1234)
    cases.append(Case("tiny_1000", f"{count} fp32 grads of 1,024-4,096 elements (random)",
                      common.numel_of(tiny), count, _impls(tiny, f32, device, backends, auto)))
    cases.append(Case("bf16_gpt2", f"GPT-2 small shapes x {width:.4g} (bf16 grads)",
                      common.numel_of(shapes), len(shapes),
                      _impls(shapes, torch.bfloat16, device, backends, auto)))
    return cases, backends, auto


def run(quick: bool = False, device: Optional[torch.device | str] = None, progress: bool = True,
        settings: Optional[Settings] = None) -> dict[str, Any]:
    """Run the benchmark and return its results section (see common.run_benchmark)."""
    return common.run_benchmark(NAME, build_cases, CPU_TARGETS, quick, device, progress,
                                settings, max_norm=MAX_NORM)
