"""The Adam/AdamW benchmark: dlopt_kernels.optim.AdamW against torch.optim.AdamW.

Cases (every implementation owns its params, grads set at random; only `opt.step()`
is timed; see `dlopt_kernels.bench.common` for how):

1. ``fp32_10m``  one 10M-element fp32 tensor.
2. ``gpt2_small`` the 148 GPT-2 small parameter shapes: 124M params on a GPU; on the
   CPU every dimension scaled by 1/3 (13.8M params, same 148 tensors).
3. ``tiny_1000``  1,000 fp32 tensors of 1K-4K elements (random sizes): per-call overhead.
   Adds two diagnostic rows: the public op and the bare compiled kernel called with
   prebuilt lists, which split our step() time into Python and kernel.
4. ``bf16_10m``   10M bf16 params: ours with stochastic rounding (fp32 states, 22 B/param)
   and with fp32 master weights (30 B/param) vs torch fused with fp32 params (28 B/param,
   the baseline the target is about) and with bf16 params and bf16 states (14 B/param).
5. ``fp64_gpt2``  the GPT-2 small shapes of case 2 in float64 (56 B/param): ours with
   backend='auto' (the C++ kernel in double on the CPU; the Triton kernel in double on
   a GPU, the CUDA kernels being fp32) vs torch's three implementations. No target: for
   information.

Ours runs on every backend available for the device (CPU tensors: cpu; CUDA tensors:
cuda, triton), plus the pure-torch reference in quick runs only (it is slow).
Baselines: torch.optim.AdamW with fused=True, foreach=True and foreach=False (for-loop).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from dlopt_kernels.bench import common
from dlopt_kernels.bench.common import Case, Impl, Runner, Settings

NAME = "optim_adam"
HPARAMS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)

# Targets (issue 3; benchmarks/README.md): on the CPU for the auto backend, on a GPU for
# each of cuda and triton (the GPT-2 list: torch fused and 85% of the D2D copy).
GPU_TARGETS = [
    ("gpt2_small", "dlopt[{b}]", "torch fused", 1.0),
    ("gpt2_small", "dlopt[{b}]", None, 85.0),
]
CPU_TARGETS = [
    # (case, ours label pattern, baseline label or None for "% of bandwidth", threshold)
    ("fp32_10m", "dlopt[{b}]", "torch fused", 1.0),
    ("fp32_10m", "dlopt[{b}]", None, 85.0),
    ("gpt2_small", "dlopt[{b}]", "torch fused", 1.0),
    ("gpt2_small", "dlopt[{b}]", None, 85.0),
    ("tiny_1000", "dlopt[{b}]", "torch fused", 2.0),
    ("bf16_10m", "dlopt[{b}] bf16 SR", "torch fused fp32", 1.2),
]


def _ours_backends(device: torch.device, quick: bool) -> tuple[list[str], str]:
    """(backends of ours to time, the one backend='auto' picks)."""
    return common.ours_backends("adam_step", device, quick)


def _ours(backend: str, **kw: Any):
    from dlopt_kernels.optim import AdamW
    return lambda params: AdamW(params, **HPARAMS, backend=backend, **kw)


def _torch(**kw: Any):
    return lambda params: torch.optim.AdamW(params, **HPARAMS, **kw)


def _fp32_impls(shapes, device, backends, auto) -> list[Impl]:
    f32 = torch.float32
    impls = [common.optimizer_impl(f"dlopt[{b}]", "ours", _ours(b), shapes, f32, device,
                                   note="backend='auto' picks this" if b == auto else "")
             for b in backends]
    impls += [
        common.optimizer_impl("torch fused", "baseline", _torch(fused=True), shapes, f32, device),
        common.optimizer_impl("torch foreach", "baseline", _torch(foreach=True), shapes, f32, device),
        common.optimizer_impl("torch for-loop", "baseline", _torch(foreach=False), shapes, f32,
                              device),
    ]
    return impls


class _OpRunner(Runner):
    """Our step without the optimizer's Python: the public op `torch.ops.dlopt.adam_step`
    (custom-op dispatch + backend choice + kernel) or the compiled kernel
    `torch.ops.dlopt_C.adam_step`, called with lists built once from the state."""

    def __init__(self, shapes, device: torch.device, backend: str, level: str) -> None:
        from dlopt_kernels.optim import AdamW
        params = common.make_params(shapes, torch.float32, device)
        self.opt = AdamW(params, **HPARAMS, backend=backend)
        self.opt.step()  # creates the state
        st = [self.opt.state[p] for p in params]
        lr = torch.tensor(HPARAMS["lr"], device=device,
                          dtype=torch.float64 if device.type == "cpu" else torch.float32)
        b1, b2 = HPARAMS["betas"]
        args = ([p for p in params], [p.grad for p in params], [s["exp_avg"] for s in st],
                [s["exp_avg_sq"] for s in st], [], [], [s["step"] for s in st], lr, b1, b2,
                HPARAMS["weight_decay"], HPARAMS["eps"], False, False, True, None, None, None)
        if level == "op":
            fn = torch.ops.dlopt.adam_step
            args = args + (backend,)
        else:
            fn = torch.ops.dlopt_C.adam_step
        self.fn, self.args = fn, args
        self.numel = sum(p.numel() for p in params)
        self.fn(*self.args)  # fail here, in build, if the signature changed

    def step(self) -> None:
        self.fn(*self.args)

    def bytes_per_param(self) -> float:
        return common.optimizer_bytes_per_param(self.opt)


def _diag_impls(shapes, device, auto) -> list[Impl]:
    from dlopt_kernels import _lib
    impls = [Impl(f"dlopt[{auto}] op only", "diag",
                  lambda: _OpRunner(shapes, device, auto, "op"),
                  note="torch.ops.dlopt.adam_step with prebuilt lists (no optimizer Python)")]
    if auto in ("cpu", "cuda") and _lib.LOADED[auto]:
        impls.append(Impl(f"dlopt[{auto}] kernel only", "diag",
                          lambda: _OpRunner(shapes, device, auto, "kernel"),
                          note="torch.ops.dlopt_C.adam_step with prebuilt lists "
                               "(no optimizer Python, no custom-op dispatch)"))
    return impls


def build_cases(device: torch.device, quick: bool) -> tuple[list[Case], list[str], str]:
    backends, auto = _ours_backends(device, quick)
    cuda = device.type == "cuda"
    cases = []

    # 1. one big fp32 tensor
    n = 50_000 if quick else 10_000_000
    shapes = [(n,)]
    cases.append(Case("fp32_10m", f"one {n:,}-element fp32 tensor", n, 1,
                      _fp32_impls(shapes, device, backends, auto)))

    # 2. GPT-2 small shapes
    width, shapes, title = common.gpt2_case_shapes(device, quick)
    # On a GPU the step time counts host launch overhead (the GPU idles at the start
    # event): the op-only and kernel-only rows show how much of it is Python.
    cases.append(Case("gpt2_small", title, common.numel_of(shapes), len(shapes),
                      _fp32_impls(shapes, device, backends, auto)
                      + (_diag_impls(shapes, device, auto) if cuda else []),
                      info={"width": width, "shapes": [list(s) for s in shapes]}))

    # 3. many tiny tensors
    count = 30 if quick else 1000
    shapes = common.random_sizes(count, 1024, 4096, seed=1234)
    cases.append(Case("tiny_1000", f"{count} fp32 tensors of 1,024-4,096 elements (random)",
                      common.numel_of(shapes), count,
                      _fp32_impls(shapes, device, backends, auto) + _diag_impls(shapes, device, auto),
                      info={"sizes": [s[0] for s in shapes]}))

    # 4. bf16 params
    n = 50_000 if quick else 10_000_000
    shapes = [(n,)]
    bf16, f32 = torch.bfloat16, torch.float32
    impls = []
    for b in backends:
        impls.append(common.optimizer_impl(
            f"dlopt[{b}] bf16 SR", "ours", _ours(b, stochastic_rounding=True), shapes, bf16,
            device, note="bf16 params, fp32 states, stochastic rounding"))
        impls.append(common.optimizer_impl(
            f"dlopt[{b}] bf16 master", "ours", _ours(b, master_weights=True), shapes, bf16,
            device, note="bf16 params, fp32 states + fp32 master weights (for information)"))
    impls.append(common.optimizer_impl("torch fused fp32", "baseline", _torch(fused=True),
                                       shapes, f32, device, note="fp32 params and states"))
    impls.append(common.optimizer_impl("torch fused bf16", "baseline", _torch(fused=True),
                                       shapes, bf16, device,
                                       note="bf16 params and bf16 states (for information)"))
    cases.append(Case("bf16_10m", f"{n:,} bf16 params vs the same count in fp32", n, 1, impls))

    # 5. float64 params (GPT-2 small shapes, as case 2)
    cases.append(common.fp64_case("adam_step", _ours, {
        f"torch {label}": _torch(**kw) for label, kw in
        (("fused", dict(fused=True)), ("foreach", dict(foreach=True)),
         ("for-loop", dict(foreach=False)))}, device, quick))
    return cases, backends, auto


def run(quick: bool = False, device: Optional[torch.device | str] = None, progress: bool = True,
        settings: Optional[Settings] = None) -> dict[str, Any]:
    """Run the benchmark and return its results section (see common.run_benchmark)."""
    return common.run_benchmark(NAME, build_cases, CPU_TARGETS, quick, device, progress,
                                settings, gpu_targets=GPU_TARGETS, hparams=HPARAMS)
