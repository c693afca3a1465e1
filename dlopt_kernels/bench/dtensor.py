"""The DTensor benchmark: dlopt_kernels.optim.AdamW on the sharded params of FSDP2
(DTensors, `Shard(0)`) against torch.optim.AdamW fused and foreach on the same DTensors.

One process holds a one-rank gloo group (a one-rank mesh: the local shard is the whole
tensor), so what is timed is the per-rank cost FSDP2 adds to a step: DTensor dispatch
(ours: the rule of dlopt_kernels/ops/_dtensor.py, then the fused kernel on the local
tensors; torch: sharding propagation of its fused / foreach ops) plus the step itself.
No communication is involved: element-wise steps need none on any number of ranks.

Cases: ``gpt2_small`` (the 148 GPT-2 small shapes, every dimension x 1/3 on the CPU)
and ``tiny_1000`` (1,000 tensors of 1K-4K elements: per-tensor overhead).
"""
from __future__ import annotations

import os
import socket
from typing import Any, Optional

import torch

from dlopt_kernels.bench import common
from dlopt_kernels.bench.common import Case, Impl, OptimizerRunner, Settings

NAME = "dtensor"
HPARAMS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

CPU_TARGETS = [
    # (case, ours label pattern, baseline label, threshold): no issue sets these; they
    # check the README's claim that FSDP2 users lose nothing by switching
    ("gpt2_small", "dlopt[{b}]", "torch fused", 1.0),
    ("tiny_1000", "dlopt[{b}]", "torch fused", 1.0),
]


_STARTED_GROUP = False  # whether _mesh started the process group (run() ends it)


def _mesh():
    """A one-rank CPU mesh, starting a one-rank gloo group if none runs."""
    global _STARTED_GROUP
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    if not dist.is_initialized():
        _STARTED_GROUP = True
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=0, world_size=1)
    return init_device_mesh("cpu", (1,))


def _impl(label: str, role: str, make_opt, shapes, device, note: str = "") -> Impl:
    def build():
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = _mesh()
        params = []
        for p in common.make_params(shapes, torch.float32, device):
            d = torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))
            d.grad = distribute_tensor(p.grad, mesh, [Shard(0)])
            params.append(d)
        return OptimizerRunner(make_opt(params), params)
    return Impl(label, role, build, note)


def build_cases(device: torch.device, quick: bool) -> tuple[list[Case], list[str], str]:
    if device.type != "cpu":
        raise ValueError("the DTensor benchmark runs on the CPU (a gloo mesh); "
                         f"got device {device}")
    from dlopt_kernels.optim import AdamW
    backends, auto = common.ours_backends("adam_step", device, quick)
    impls = [(f"dlopt[{b}]", "ours", lambda ps, b=b: AdamW(ps, **HPARAMS, backend=b))
             for b in backends]
    impls += [("torch fused", "baseline", lambda ps: torch.optim.AdamW(ps, **HPARAMS, fused=True)),
              ("torch foreach", "baseline",
               lambda ps: torch.optim.AdamW(ps, **HPARAMS, foreach=True))]
    width = 1 / 48 if quick else 1 / 3
    count = 30 if quick else 1000
    cases = []
    for name, title, shapes in (
            ("gpt2_small", f"GPT-2 small shapes x {width:.4g} as Shard(0) DTensors",
             common.gpt2_small_shapes(width)),
            ("tiny_1000", f"{count} Shard(0) DTensors of 1,024-4,096 elements (random)",
             common.random_sizes(count, 1024, 4096, seed=1234))):
        cases.append(Case(name, title, common.numel_of(shapes), len(shapes),
                          [_impl(label, role, make, shapes, device) for label, role, make in impls]))
    return cases, backends, auto


def run(quick: bool = False, device: Optional[torch.device | str] = None, progress: bool = True,
        settings: Optional[Settings] = None) -> dict[str, Any]:
    """Run the benchmark and return its results section (see common.run_benchmark)."""
    global _STARTED_GROUP
    try:
        return common.run_benchmark(NAME, build_cases, CPU_TARGETS, quick, device or "cpu",
                                    progress, settings, hparams=HPARAMS,
                                    mesh="one-rank gloo, Shard(0)")
    finally:
        if _STARTED_GROUP:
            import torch.distributed as dist
            dist.destroy_process_group()
            _STARTED_GROUP = False
