"""A CUDA step (or norm) must not depend on how multi_tensor_apply packs its launches.

One optimizer over many tensors goes in 32 KB launch tables where the GPU takes them
(csrc/include/dlopt/multi_tensor_apply.cuh, kLargeArgs), or in several 4 KB tables
(DLOPT_CUDA_SMALL_TABLES=1), blocks finding their tensor by a search over the table
(mta::locate); one optimizer per tensor fits one 4 KB table. Each element's update is the same arithmetic either way
(position invariance: test_position_invariance.py), so the list step must match the
per-tensor steps bit for bit, in both table sizes. The switch is read once per process,
hence the subprocesses. Needs a GPU (the CUDA backend).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from test_position_invariance import CASES

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_ready() -> bool:
    from dlopt_kernels import _lib
    return torch.cuda.is_available() and _lib.LOADED["cuda"]


def _sizes(gen: torch.Generator) -> list[int]:
    """~600 tensors: many small (more than a 4 KB table's 60 of Adam's slots, and more
    than a 32 KB table's ~500), a few over 64K elements (several chunks each)."""
    small = torch.randint(1, 5000, (600,), generator=gen).tolist()
    big = torch.randint(65_537, 300_000, (6,), generator=gen).tolist()
    return small[:200] + big[:3] + small[200:] + big[3:]


def worker(precision: str) -> None:
    """Step every case on the list and per tensor; exit 1 naming each case and the first
    tensor that differs."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    extra = dict(master_weights=True) if precision == "bf16_master" else {}
    failed = []
    for name, (cls, kwargs) in CASES.items():
        gen = torch.Generator().manual_seed(1234)
        values = [torch.randn(n, generator=gen).to(dtype).cuda() for n in _sizes(gen)]
        together = [nn.Parameter(v.clone()) for v in values]
        alone = [nn.Parameter(v.clone()) for v in values]
        opt = cls(together, backend="cuda", **kwargs, **extra)
        opts = [cls([p], backend="cuda", **kwargs, **extra) for p in alone]
        for _ in range(2):
            grads = [torch.randn(v.shape, generator=gen).to(dtype).cuda() for v in values]
            for p, q, g in zip(together, alone, grads):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            for o in opts:
                o.step()
        bad = [i for i, (p, q) in enumerate(zip(together, alone)) if not torch.equal(p, q)]
        if bad:
            failed.append(f"{name}: {len(bad)} tensors differ, the first is tensor {bad[0]} "
                          f"({together[bad[0]].numel()} elements)")
    # the reductions (multi_tensor_reduce: LAMB's norms, clip_grad_norm_) pack alike:
    # each chunk's partial lands in its own slot, so a list's norms equal each tensor's
    # norm taken alone
    gen = torch.Generator().manual_seed(99)
    values = [torch.randn(n, generator=gen).to(dtype).cuda() for n in _sizes(gen)]
    for ord_ in (2.0, float("inf")):
        together = torch.ops.dlopt.multi_tensor_norm(values, ord_, "cuda")[0]
        alone = torch.stack([torch.ops.dlopt.multi_tensor_norm([v], ord_, "cuda")[0][0]
                             for v in values])
        if not torch.equal(together, alone):
            bad = (together != alone).nonzero().flatten().tolist()
            failed.append(f"multi_tensor_norm ord={ord_}: {len(bad)} norms differ, the first "
                          f"is tensor {bad[0]}")
    print("\n".join(failed) if failed else "ok")
    sys.exit(1 if failed else 0)


@pytest.mark.skipif(not _cuda_ready(), reason="needs a GPU and the CUDA library")
@pytest.mark.parametrize("small_tables", [False, True], ids=["default", "small_tables"])
@pytest.mark.parametrize("precision", ["fp32", "bf16_master"])
def test_cuda_list_step_matches_per_tensor_steps(precision, small_tables):
    env = dict(os.environ)
    env.pop("DLOPT_CUDA_SMALL_TABLES", None)
    if small_tables:
        env["DLOPT_CUDA_SMALL_TABLES"] = "1"
    code = (f"import sys; sys.path[:0] = [{HERE!r}, {os.path.dirname(HERE)!r}]; "
            f"from test_cuda_tables import worker; worker({precision!r})")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
