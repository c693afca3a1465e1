"""The torch.optim step contract around our step: per-optimizer and global step pre- and
post-hooks (a pre-hook may replace the arguments), and the profiler's
`Optimizer.step#<class>.step` range. Our classes wrap step themselves
(optim/_base.py `_hook_step`: the range only while a profiler runs), so these check that
nothing torch's own wrapper gives was lost, against torch.optim.AdamW as the twin."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

from dlopt_kernels import optim

CLASSES = [optim.AdamW, optim.SGD, optim.LAMB, optim.Adafactor]


def _one_param() -> list[nn.Parameter]:
    p = nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    return [p]


@pytest.mark.parametrize("cls", CLASSES + [torch.optim.AdamW], ids=lambda c: c.__name__)
def test_step_hooks_run_in_torch_order(cls):
    opt = cls(_one_param(), lr=1e-3)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global_pre", o))),
        opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o))),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global_post", o))),
    ]
    try:
        opt.step()
    finally:
        for h in handles:
            h.remove()
    assert calls == [("global_pre", opt), ("pre", opt), ("post", opt), ("global_post", opt)]
    opt.step()  # removed hooks stay removed
    assert len(calls) == 4


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_pre_hook_may_replace_the_arguments(cls):
    opt = cls(_one_param(), lr=1e-3)
    seen = []

    def closure():
        seen.append("closure")
        return torch.tensor(3.0)

    opt.register_step_pre_hook(lambda o, a, k: ((o,), {"closure": closure}))
    loss = opt.step()
    assert seen == ["closure"] and loss.item() == 3.0


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_pre_hook_returning_garbage_raises_like_torch(cls):
    opt = cls(_one_param(), lr=1e-3)
    opt.register_step_pre_hook(lambda o, a, k: "nonsense")
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        opt.step()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_profiler_sees_the_step_range(cls):
    opt = cls(_one_param(), lr=1e-3)
    opt.step()  # first step outside the profiler
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = {e.name for e in prof.events()}
    assert f"Optimizer.step#{cls.__name__}.step" in names


def test_step_is_wrapped_once():
    # LAMB's step calls FusedOptimizer.step through super(): the hooks must run once
    opt = optim.LAMB(_one_param(), lr=1e-3)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    opt.step()
    assert calls == [1]
    assert getattr(type(opt).step, "hooked", False)
