"""Helpers the drop-in optimizer tests share (tests/optim/test_sgd.py, test_adagrad.py,
test_rmsprop.py): twin runs against the torch.optim class of the same name, state
comparison, checkpoint round trips, snapshots for "a refused call changes nothing",
PyTorch's optimizer test database, and a small training task. Not a test module."""
from __future__ import annotations

import copy
import io
import math
import pathlib
import re

import pytest
import torch
from torch import nn

from tolerances import tol

FP32 = tol(torch.float32)
SHAPES = [(7, 13), (13,), (3, 7), (3,), ()]
OUR_EXTRAS = ("backend", "master_weights", "stochastic_rounding")


def make_params(shapes=SHAPES, dtype=torch.float32):
    return [nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]


def clone_params(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def rand_grads(params, scale=1.0):
    return [torch.randn_like(p) * scale for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def torch_kwargs(kwargs):
    """Ours' constructor kwargs without our extras, for the torch twin."""
    return {k: v for k, v in kwargs.items() if k not in OUR_EXTRAS}


def assert_same_training(ours, ps_ours, ref, ps_ref, tolerance=FP32):
    """Params and every state tensor torch keeps agree; the same state keys (ours may
    add master_param) and dtypes; params torch keeps no state for have none here.
    States are compared normwise (the absolute tolerance scaled by the tensor's largest
    |value|): a state such as RMSprop's momentum buffer sums large terms that cancel,
    and fp32 rounding bounds its error relative to the tensor's scale, not per element."""
    for a, b in zip(ps_ours, ps_ref):
        torch.testing.assert_close(a.detach(), b.detach(), **tolerance)
        sa, sb = ours.state.get(a, {}), ref.state.get(b, {})
        assert set(sb) <= set(sa) and set(sa) - set(sb) <= {"master_param"}, (set(sa), set(sb))
        for key, want in sb.items():
            got = sa[key]
            if key == "step":
                assert float(got) == float(want)
            else:
                assert got.dtype == want.dtype, key
                scale = float(want.abs().max()) if want.numel() else 0.0
                torch.testing.assert_close(got, want, rtol=tolerance["rtol"],
                                           atol=tolerance["atol"] + tolerance["rtol"] * scale)
    assert len(ours.state_dict()["state"]) == len(ref.state_dict()["state"])


def twin_run(cls, twin_cls, kwargs, params, n_steps, ours=None, ref=None, ps_ref=None,
             grad_scales=None):
    """Build (or continue) ours and the torch twin (for-loop implementation) on the same
    params and grads, comparing after every step."""
    ps_ref = clone_params(params) if ps_ref is None else ps_ref
    ours = cls(params, **kwargs) if ours is None else ours
    if ref is None:
        ref = twin_cls(ps_ref, **dict(torch_kwargs(kwargs), foreach=False))
    for k in range(n_steps):
        s = 1.0 if grad_scales is None else grad_scales[k % len(grad_scales)]
        grads = rand_grads(params, s)
        set_grads(params, grads)
        set_grads(ps_ref, grads)
        ours.step()
        ref.step()
        assert_same_training(ours, params, ref, ps_ref)
    return ours, ref, ps_ref


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


# --------------------------------------------------- "a refused call changes nothing"
def _bits(t):
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.clone()


def snapshot(params, opt=None):
    return {
        "params": [_bits(p) for p in params],
        "grads": [None if p.grad is None else _bits(p.grad) for p in params],
        "state": None if opt is None else {
            i: {k: _bits(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
            for i, st in opt.state_dict()["state"].items()},
        "groups": None if opt is None else copy.deepcopy(
            [{k: v for k, v in g.items() if k != "params"} | {"n": len(g["params"])}
             for g in opt.param_groups]),
    }


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8) if a.numel() else a,
                                b.reshape(-1).view(torch.uint8) if b.numel() else b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def assert_unchanged(before, params, opt=None):
    after = snapshot(params, opt)
    for key in before:
        assert _same(before[key], after[key]), f"{key} changed by a refused call"


def assert_construction_refused(cls, params, kwargs, exc, name):
    """cls(params, **kwargs) raises `exc` whose message names `name`, and changes nothing."""
    real = [p for p in params if p.device.type != "meta"]
    before = snapshot(real)
    with pytest.raises(exc, match=rf"\b{name}"):
        cls(params, **kwargs)
    assert_unchanged(before, real)


# ----------------------------------------------- PyTorch's optimizer test database
def optim_db_configs(name):
    """Every kwargs combination torch's optim_db tries for optimizer `name` (cpu and
    cuda inputs, with the global foreach / fused / differentiable flags), deduplicated,
    as pytest params (kwargs,)."""
    co = pytest.importorskip("torch.testing._internal.common_optimizers")
    info = next(i for i in co.optim_db if i.optim_cls.__name__ == name)
    out, seen = [], set()
    for device in ("cpu", "cuda"):
        inputs = list(info.optim_inputs_func(device=device))
        inputs += co._get_optim_inputs_including_global_cliquey_kwargs(device, torch.float32, info)
        for oi in inputs:
            key = repr(sorted((k, repr(v)) for k, v in oi.kwargs.items()))
            if key not in seen:
                seen.add(key)
                out.append(pytest.param(oi.kwargs, id=f"{device}-{oi.desc}"))
    return out


def optim_db_error_inputs(name):
    co = pytest.importorskip("torch.testing._internal.common_optimizers")
    info = next(i for i in co.optim_db if i.optim_cls.__name__ == name)
    out = [pytest.param(ei, id=ei.optimizer_error_input.desc)
           for ei in info.optim_error_inputs_func(device="cpu", dtype=torch.float32)]
    # the cuda-only error inputs, with a CPU param (the rules do not depend on the device)
    kws = [({"foreach": True, "fused": True}, "`fused` and `foreach`"),
           ({"fused": True, "differentiable": True}, "`fused` does not support")]
    if "fused" in info.supported_impls:
        for kw, regex in kws:
            ei = co.ErrorOptimizerInput(co.OptimizerInput(params=[torch.empty(())], kwargs=kw,
                                                          desc=regex),
                                        error_type=RuntimeError, error_regex=regex)
            out.append(pytest.param(ei, id=f"cuda-{'-'.join(kw)}"))
    return out


def reference_kwargs(kwargs):
    """The same maths in torch's for-loop implementation on CPU tensors (capturable and
    the implementation flags do not change the result)."""
    return {k: v for k, v in kwargs.items()
            if k not in ("foreach", "fused", "capturable", "differentiable")}


def run_optim_db_config(cls, twin_cls, kwargs, refused):
    """Ours either trains like torch for 3 steps or refuses with an error naming the
    argument (refused: kwarg -> reason; docs/compat.md lists them)."""
    kwargs = copy.deepcopy(kwargs)
    params = [nn.Parameter(torch.randn(s)) for s in [(5, 3), (3,), (), (4, 1)]]
    bad = next((k for k in refused if kwargs.get(k)), None)
    if bad:
        assert_construction_refused(cls, params, kwargs, (ValueError, TypeError), bad)
        return
    ours = cls(params, **kwargs)
    ps_ref = clone_params(params)
    ref = twin_cls(ps_ref, **reference_kwargs(kwargs), foreach=False)
    for _ in range(3):
        set_grads(params, rand_grads(params))
        set_grads(ps_ref, [p.grad for p in params])
        ours.step()
        ref.step()
        assert_same_training(ours, params, ref, ps_ref)


def check_optim_db_error_input(cls, error_input):
    """Ours raises an error of (a subclass of) the type torch raises, or a ValueError /
    TypeError naming the offending argument; warnings are warned alike."""
    co = pytest.importorskip("torch.testing._internal.common_optimizers")
    oi = error_input.optimizer_error_input
    kwargs = copy.deepcopy(oi.kwargs)

    def trigger():
        opt = cls(oi.params, **kwargs)
        if error_input.error_on == co.OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            trigger()
        return
    with pytest.raises(Exception) as info:
        trigger()
    exc = info.value
    if isinstance(exc, error_input.error_type):
        return
    assert isinstance(exc, (ValueError, TypeError)), f"{type(exc).__name__}: {exc}"
    named = list(kwargs) or ["param"]
    assert any(re.search(rf"\b{re.escape(k)}", str(exc)) for k in named), (
        f"the error must name one of {named}: {exc}")


# ------------------------------------------------------------------ training check
def train_regression(make_opt, steps=60, seed=0):
    """A 2-layer MLP fit to a fixed random teacher on synthetic data (fixed seed, so
    ours and torch see the same data and init); returns the final full-batch loss."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=gen)
    teacher = torch.randn(8, 4, generator=gen)
    y = torch.tanh(x @ teacher)
    torch.manual_seed(seed)
    model = mlp()
    opt = make_opt(model.parameters())
    for k in range(steps):
        xb, yb = x[(k * 32) % 256:][:32], y[(k * 32) % 256:][:32]
        opt.zero_grad()
        (model(xb) - yb).square().mean().backward()
        opt.step()
    with torch.no_grad():
        return float((model(x) - y).square().mean()), float(y.square().mean())


COMPAT_DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "compat.md"


def assert_refusals_documented(refused):
    """Every refusal of an optim_db config is listed in docs/compat.md."""
    text = COMPAT_DOC.read_text()
    for flag in refused:
        assert f"{flag}=True" in text, f"docs/compat.md must list the refusal of {flag}=True"
