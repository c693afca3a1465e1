"""The two walks of the C++ CPU kernels' two-stream loops (plain SGD: the chunk's halves
side by side, or one walk; cpu_elementwise.h walk_halves picks by CPU vendor, and
DLOPT_CPU_WALK overrides it once per process): both give the same bits, on sizes around
the block and chunk edges, in every store mode a two-stream loop has; a bad value of the
variable is a ValueError naming it."""
import os
import subprocess
import sys

import pytest
import torch

from dlopt_kernels.backends import available_backends

pytestmark = pytest.mark.skipif("cpu" not in available_backends("cpu"),
                                reason="the C++ CPU library is not loaded")

# one step of plain SGD (two streams: param and grad) per store mode, over sizes at the
# edges of the 64-element blocks, of a chunk's halves and of the 32768-element chunks
SCRIPT = r"""
import sys, torch
import dlopt_kernels.optim as O
torch.manual_seed(int(sys.argv[2]))
sizes = [1, 63, 64, 127, 128, 129, 255, 4097, 32767, 32768, 32769, 65536 + 300, 278011]
out = {}
for dtype, sr in ((torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
                  (torch.bfloat16, True)):
    ps = [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in sizes]
    for p in ps:
        p.grad = torch.randn(p.shape).to(dtype)
    O.SGD(ps, lr=0.1, backend="cpu", stochastic_rounding=sr).step()
    out[f"{dtype}-{sr}"] = ([p.detach().clone() for p in ps], [p.grad.clone() for p in ps])
torch.save(out, sys.argv[1])
"""


def _run(tmp_path, walk, seed):
    path = tmp_path / f"{walk}.pt"
    env = dict(os.environ, DLOPT_CPU_WALK=walk)
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(seed)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return torch.load(path)


def test_both_walks_give_the_same_bits(tmp_path):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    halves, single = _run(tmp_path, "halves", seed), _run(tmp_path, "single", seed)
    assert halves.keys() == single.keys()
    for key in halves:
        (ph, gh), (ps, gs) = halves[key], single[key]
        for a, b, ga, gb in zip(ph, ps, gh, gs):
            assert torch.equal(ga, gb)  # same inputs
            assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                               b.view(torch.int16 if b.element_size() == 2 else torch.int32)), key
        if key == "torch.float32-False":  # and the step is the step: p - lr * g, exactly
            gen = torch.Generator().manual_seed(seed)  # the script's first draws
            for a, ga in zip(ph, gh):
                assert torch.equal(a, torch.randn(a.shape, generator=gen) - 0.1 * ga)


def test_a_bad_walk_is_a_value_error_naming_the_variable():
    env = dict(os.environ, DLOPT_CPU_WALK="sideways")
    code = ("import torch, dlopt_kernels.optim as O\n"
            "p = torch.nn.Parameter(torch.randn(300)); p.grad = torch.randn(300)\n"
            "try:\n    O.SGD([p], lr=0.1, backend='cpu').step()\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ValueError: DLOPT_CPU_WALK must be auto, halves or single, got 'sideways'" in res.stdout
