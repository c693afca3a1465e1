"""An element's update must not depend on where it sits in its tensor.

Compiled loops split a tensor into a vector body and a scalar remainder, and the
compiler may contract `a*b + c*d` into an FMA differently in the two (see fmadd in
csrc/include/dlopt/weight_decay.h). Here each elementwise optimizer steps the same
values twice: in order, and rolled by a few places, so that every element falls in
another vector lane, and some move between the remainder and the body. Rolled back, the
results must agree bit for bit.

Not covered here: stochastic rounding (its random bits follow the element's index, so
rolled elements round differently by design) and LAMB / Adafactor (their per-tensor
norms sum in another order when the elements move).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import device_backends
from dlopt_kernels import optim

CASES = {
    "SGD": (optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "SGD_nesterov": (optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    # no momentum: two streams, walked as two halves of each chunk (cpu_elementwise.h)
    "SGD_plain": (optim.SGD, dict(lr=0.1, weight_decay=0.01)),
    "Adam": (optim.Adam, dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    "AdamW": (optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "Adagrad": (optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01)),
    "RMSprop": (optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)),
    "Lion": (optim.Lion, dict(lr=0.01, weight_decay=0.1)),
}
NUMEL = 1003  # not a multiple of any vector width: every run has a remainder
SHIFTS = (1, 7, 500)


@pytest.mark.parametrize("device,backend", [db for db in device_backends()
                                            if db[1] in ("cpu", "cuda")])
@pytest.mark.parametrize("precision", ["fp32", "bf16_master", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_update_does_not_depend_on_position(name, precision, device, backend):
    cls, kwargs = CASES[name]
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    extra = dict(master_weights=True) if precision == "bf16_master" else {}
    values = torch.randn(NUMEL, device=device).to(dtype)
    grads = [torch.randn(NUMEL, device=device).to(dtype) for _ in range(3)]
    params = [nn.Parameter(values.roll(s)) for s in (0,) + SHIFTS]
    opts = [cls([p], backend=backend, **kwargs, **extra) for p in params]
    for g in grads:
        for s, p in zip((0,) + SHIFTS, params):
            p.grad = g.roll(s)
        for opt in opts:
            opt.step()
    for s, p in zip(SHIFTS, params[1:]):
        assert torch.equal(p.detach().roll(-s), params[0].detach()), (
            f"{name} ({precision}): rolled by {s}, the param stepped differently")
