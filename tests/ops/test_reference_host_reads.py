"""The pure-torch reference kernels (the backend of MPS, XLA and every other device, and
of float64 params on a GPU) read a call's scalars from the device a fixed number of times,
not once per tensor: the step counts come back in one transfer (count_steps). A read per
tensor would make the host wait on the device once per tensor on those devices."""
from __future__ import annotations

import pytest
import torch

import dlopt_kernels  # noqa: F401  (registers torch.ops.dlopt)


def _count_reads(monkeypatch):
    """Counts Tensor.__float__, __int__ and item() calls (each a host read of a device
    value) from here on."""
    calls = {"n": 0}
    for name in ("__float__", "__int__", "item"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            calls["n"] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def _lists(n, dtype=torch.float32):
    params = [torch.randn(3, 2, dtype=dtype) for _ in range(n)]
    return (params, [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.rand_like(p) for p in params], [torch.zeros(()) for _ in params])


@pytest.mark.parametrize("op", ["adam", "adagrad", "lamb", "rmsprop", "lion"])
def test_host_reads_do_not_grow_with_the_tensor_count(op, monkeypatch):
    reads = []
    for n in (2, 40):
        p, g, s1, s2, steps = _lists(n)
        lr = torch.tensor(1e-3, dtype=torch.float64)
        gs, fi = torch.tensor(2.0), torch.tensor(0.0)
        calls = _count_reads(monkeypatch)
        if op == "adam":
            torch.ops.dlopt.adam_step(p, g, s1, s2, [], [], steps, lr, 0.9, 0.999, 0.01, 1e-8,
                                      False, False, True, gs, fi, None, "reference")
        elif op == "adagrad":
            torch.ops.dlopt.adagrad_step(p, g, s2, [], steps, lr, 0.01, 0.0, 1e-10, False, gs,
                                         fi, None, "reference")
        elif op == "lamb":
            torch.ops.dlopt.lamb_step(p, g, s1, s2, [], steps, lr, 0.9, 0.999, 0.01, 1e-6,
                                      True, 0.0, None, gs, fi, None, "reference")
        elif op == "rmsprop":
            torch.ops.dlopt.rmsprop_step(p, g, s2, [], [], [], steps, lr, 0.99, 1e-8, 0.0,
                                         0.0, False, False, gs, fi, None, "reference")
        else:
            torch.ops.dlopt.lion_step(p, g, s1, [], steps, lr, 0.9, 0.99, 0.0, False, gs, fi,
                                      None, "reference")
        monkeypatch.undo()
        reads.append(calls["n"])
        assert all(float(s) == 1.0 for s in steps)  # every step counted once
    assert reads[0] == reads[1] <= 4, reads  # lr, grad_scale, found_inf (and a seed)
