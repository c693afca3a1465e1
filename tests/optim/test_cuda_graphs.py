"""An optimizer step captured in a CUDA graph and replayed must match eager steps.

The CUDA and Triton kernels read lr, step, grad_scale / found_inf and the SR seed from
device memory and make no host sync (docs/compat.md: `capturable` is accepted and the
step is capturable whatever it says). Here the step of each element-wise optimizer is
captured once (torch's recipe: warm-up steps on a side stream, then
`torch.cuda.graph`), replayed with new grads copied into the static grad tensors and
a tensor lr changed between replays (as a scheduler would), and compared with an
eager twin stepping the same grads. Enough tensors that the CUDA launches need the
32 KB tables (tests/optim/test_cuda_tables.py). Needs a GPU.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import GPU
from dlopt_kernels.backends import available_backends
from test_position_invariance import CASES

BACKENDS = [b for b in (available_backends("cuda") if GPU else []) if b in ("cuda", "triton")]


def _params(dtype: torch.dtype) -> list[nn.Parameter]:
    sizes = torch.randint(1, 3000, (400,)).tolist() + [70_000, 1]
    return [nn.Parameter(torch.randn(n, device="cuda").to(dtype)) for n in sizes]


@pytest.mark.skipif(not BACKENDS, reason="needs a GPU with the CUDA or Triton backend")
@pytest.mark.parametrize("backend", BACKENDS or ["cuda"])
@pytest.mark.parametrize("precision", ["fp32", "bf16_master"])
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_graph_replay_matches_eager(name, precision, backend):
    cls, kwargs = CASES[name]
    kwargs = dict(kwargs)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    extra = dict(master_weights=True) if precision == "bf16_master" else {}
    start_lr = float(kwargs.pop("lr"))
    graphed = _params(dtype)
    eager = [nn.Parameter(p.detach().clone()) for p in graphed]
    lr_g = torch.tensor(start_lr, device="cuda")
    lr_e = torch.tensor(start_lr, device="cuda")
    opt_g = cls(graphed, lr=lr_g, backend=backend, **kwargs, **extra)
    opt_e = cls(eager, lr=lr_e, backend=backend, **kwargs, **extra)

    def new_grads():
        grads = [torch.randn(p.shape, device="cuda").to(dtype) for p in graphed]
        for p, q, g in zip(graphed, eager, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)  # the graph reads these very tensors
            q.grad = g.clone()

    # warm-up (creates the state and compiles / caches everything) on a side stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            new_grads()
            opt_g.step()
            opt_e.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    new_grads()
    with torch.cuda.graph(graph):
        opt_g.step()
    # capture records the step without running it: the eager twin takes the same grads
    # at the first replay
    for i in range(4):
        if i:
            new_grads()
        lr_g.fill_(start_lr * (0.5 ** i))
        lr_e.fill_(start_lr * (0.5 ** i))
        graph.replay()
        opt_e.step()
    torch.cuda.synchronize()
    # the same kernels on the same inputs, element-wise: bit for bit
    bad = [i for i, (p, q) in enumerate(zip(graphed, eager)) if not torch.equal(p, q)]
    assert not bad, (f"{name} ({precision}, {backend}): {len(bad)} params differ after "
                     f"replays, the first is params[{bad[0]}]")
