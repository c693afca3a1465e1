"""PyTorch's own optimizer test database (torch.testing._internal.common_optimizers
.optim_db) run against ours: every constructor-argument combination torch's tests try
for Adam and AdamW (optim_inputs_func for device "cpu" and "cuda", each with the
global "cliquey" flags foreach / fused / differentiable switched on one at a time)
either trains step by step like torch, or is refused with a clear ValueError /
TypeError. The refusals are few and listed in docs/compat.md. torch's error inputs
(optim_error_inputs_func) must raise here too.
"""
from __future__ import annotations

import copy
import pathlib
import re

import pytest
import torch
from torch import nn

from tolerances import tol

from dlopt_kernels.optim import Adam, AdamW

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")
OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum

OURS = {"Adam": Adam, "AdamW": AdamW}
INFOS = {info.optim_cls.__name__: info for info in common_optimizers.optim_db
         if info.optim_cls.__name__ in OURS}

# Configs ours refuses, and why (docs/compat.md says the same).
REFUSED = {
    "differentiable": "a fused in-place step has no autograd graph; use torch.optim",
}
COMPAT_DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "compat.md"


def _configs():
    out, seen = [], set()
    for name, info in INFOS.items():
        for device in ("cpu", "cuda"):
            inputs = list(info.optim_inputs_func(device=device))
            inputs += common_optimizers._get_optim_inputs_including_global_cliquey_kwargs(
                device, torch.float32, info)
            for oi in inputs:
                key = (name, repr(sorted((k, repr(v)) for k, v in oi.kwargs.items())))
                if key in seen:
                    continue
                seen.add(key)
                out.append(pytest.param(name, oi.kwargs, id=f"{name}-{device}-{oi.desc}"))
    return out


def _refusal(kwargs):
    return next((k for k in REFUSED if kwargs.get(k)), None)


def _as_float(x):
    return float(x) if isinstance(x, torch.Tensor) else x


def _torch_reference_kwargs(kwargs):
    """The same maths in torch's for-loop implementation on CPU tensors: capturable
    (CUDA graphs) and the implementation flags do not change the result."""
    ref = {k: v for k, v in kwargs.items()
           if k not in ("foreach", "fused", "capturable", "differentiable")}
    if "betas" in ref:
        ref["betas"] = tuple(_as_float(b) for b in ref["betas"])
    return ref


@pytest.mark.parametrize("name,kwargs", _configs())
def test_optim_db_config(name, kwargs):
    kwargs = copy.deepcopy(kwargs)
    params = [nn.Parameter(torch.randn(s)) for s in [(5, 3), (3,), (), (4, 1)]]
    refused = _refusal(kwargs)
    if refused:
        before = [p.detach().clone() for p in params]
        with pytest.raises((ValueError, TypeError), match=refused):
            OURS[name](params, **kwargs)
        assert all(torch.equal(p, q) for p, q in zip(params, before))
        return
    ours = OURS[name](params, **kwargs)
    ps_ref = [nn.Parameter(p.detach().clone()) for p in params]
    ref = getattr(torch.optim, name)(ps_ref, **_torch_reference_kwargs(kwargs), foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, ps_ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(params, ps_ref):
            torch.testing.assert_close(p.detach(), q.detach(), **tol(torch.float32))
            for key, value in ref.state[q].items():
                if key != "step":
                    torch.testing.assert_close(ours.state[p][key], value, **tol(torch.float32))
    assert float(ours.state[params[0]]["step"]) == 3


def test_refusals_are_documented():
    text = COMPAT_DOC.read_text()
    for flag in REFUSED:
        assert f"{flag}=True" in text, f"docs/compat.md must list the refusal of {flag}=True"


def _error_inputs():
    out = []
    for name, info in INFOS.items():
        for ei in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
            out.append(pytest.param(name, ei, id=f"{name}-{ei.optimizer_error_input.desc}"))
        # optim_error_inputs_func(device="cuda") builds its params on the GPU; the same
        # two inputs with a CPU param (the rules do not depend on the device):
        sample = [torch.empty(())]
        for kw, regex in (({"foreach": True, "fused": True}, "`fused` and `foreach`"),
                          ({"fused": True, "differentiable": True}, "`fused` does not support")):
            ei = common_optimizers.ErrorOptimizerInput(
                common_optimizers.OptimizerInput(params=sample, kwargs=kw, desc=regex),
                error_type=RuntimeError, error_regex=regex)
            out.append(pytest.param(name, ei, id=f"{name}-cuda-{'-'.join(kw)}"))
    return out


@pytest.mark.parametrize("name,error_input", _error_inputs())
def test_optim_db_error_input(name, error_input):
    """Ours raises an error of (a subclass of) the type torch raises, or a ValueError /
    TypeError naming the offending argument; warnings are warned alike."""
    oi = error_input.optimizer_error_input
    cls = OURS[name]
    kwargs = copy.deepcopy(oi.kwargs)
    err_type = error_input.error_type

    def trigger():
        opt = cls(oi.params, **kwargs)
        if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    if issubclass(err_type, Warning):
        with pytest.warns(err_type, match=error_input.error_regex):
            trigger()
        return
    with pytest.raises(Exception) as info:
        trigger()
    exc = info.value
    if isinstance(exc, err_type):
        return
    assert isinstance(exc, (ValueError, TypeError)), f"{type(exc).__name__}: {exc}"
    named = list(kwargs) or ["param"]
    assert any(re.search(rf"\b{re.escape(k)}", str(exc)) for k in named), (
        f"the error must name one of {named}: {exc}")
