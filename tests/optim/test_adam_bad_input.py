"""Bad and odd input to Adam / AdamW. Bad input gets a clear ValueError or TypeError
naming the argument (never a crash or a hang), and leaves everything the user passed
as it was: params, grads and optimizer state are snapshotted before the failing call
and compared bit for bit after. Odd but valid input (NaN/inf grads, zero-size and
0-dim params, non-contiguous params and grads, params on the meta device) behaves as
torch.optim does.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import CPU_BACKENDS, GPU
from optim_twin_helpers import assert_construction_refused, assert_unchanged, snapshot
from tolerances import tol

from dlopt_kernels.backends import registry
from dlopt_kernels.optim import Adam, AdamW

CLASSES = [Adam, AdamW]
TWIN = {Adam: torch.optim.Adam, AdamW: torch.optim.AdamW}
NAN = float("nan")


def _params(dtype=torch.float32, grads=True):
    ps = [nn.Parameter(torch.randn(4, 3).to(dtype)), nn.Parameter(torch.randn(3).to(dtype))]
    if grads:
        for p in ps:
            p.grad = torch.randn_like(p)
    return ps


# ----------------------------------------------------------- refused at construction

INT_P = lambda: [torch.zeros(3, dtype=torch.int64)]  # noqa: E731
CONSTRUCTION = {
    # id: (kwargs, params factory or None for the default, exception type, argument named)
    "lr_negative": (dict(lr=-1e-3), None, ValueError, "lr"),
    "lr_nan": (dict(lr=NAN), None, ValueError, "lr"),
    "lr_tensor_nan": (dict(lr=torch.tensor(NAN)), None, ValueError, "lr"),
    "lr_tensor_negative": (dict(lr=torch.tensor(-0.1)), None, ValueError, "lr"),
    "lr_tensor_two_elements": (dict(lr=torch.tensor([1e-3, 1e-3])), None, ValueError, "lr"),
    "lr_string": (dict(lr="0.01"), None, TypeError, "lr"),
    "beta1_one": (dict(betas=(1.0, 0.999)), None, ValueError, "betas"),
    "beta2_one": (dict(betas=(0.9, 1.0)), None, ValueError, "betas"),
    "beta1_negative": (dict(betas=(-0.1, 0.999)), None, ValueError, "betas"),
    "beta2_above_one": (dict(betas=(0.9, 1.5)), None, ValueError, "betas"),
    "beta2_nan": (dict(betas=(0.9, NAN)), None, ValueError, "betas"),
    "betas_three": (dict(betas=(0.9, 0.99, 0.9)), None, TypeError, "betas"),
    "betas_scalar": (dict(betas=0.9), None, TypeError, "betas"),
    "eps_negative": (dict(eps=-1e-8), None, ValueError, "eps"),
    "eps_nan": (dict(eps=NAN), None, ValueError, "eps"),
    "weight_decay_negative": (dict(weight_decay=-0.1), None, ValueError, "weight_decay"),
    "weight_decay_nan": (dict(weight_decay=NAN), None, ValueError, "weight_decay"),
    "amsgrad_not_bool": (dict(amsgrad="yes"), None, TypeError, "amsgrad"),
    "maximize_not_bool": (dict(maximize=1), None, TypeError, "maximize"),
    "differentiable": (dict(differentiable=True), None, ValueError, "differentiable"),
    "foreach_and_fused": (dict(foreach=True, fused=True), None, ValueError, "fused"),
    "master_and_sr": (dict(master_weights=True, stochastic_rounding=True), None, ValueError,
                      "stochastic_rounding"),
    "sr_fp16_params": (dict(stochastic_rounding=True), lambda: _params(torch.float16),
                       ValueError, "stochastic_rounding"),
    "int_params": (dict(), INT_P, TypeError, "params"),
    "complex32_params": (dict(), lambda: [torch.zeros(3, dtype=torch.complex32)], TypeError,
                         "params"),
    # (float64 params on the fp32 CUDA kernels: tests/optim/test_wide_dtypes.py)
    "sparse_params": (dict(), lambda: [torch.randn(4).to_sparse().requires_grad_()], TypeError,
                      "params"),
    "empty_params": (dict(), lambda: [], ValueError, "param"),
    "unknown_backend": (dict(backend="bogus"), None, ValueError, "backend"),
    "backend_none": (dict(backend=None), None, ValueError, "backend"),
    "cpu_backend_for_meta": (dict(backend="cpu"),
                             lambda: _params() + [nn.Parameter(torch.empty(3, device="meta"))],
                             ValueError, "backend"),
}
if not GPU:
    CONSTRUCTION["unavailable_backend_cuda"] = (dict(backend="cuda"), None, ValueError, "backend")


@pytest.mark.parametrize("case", list(CONSTRUCTION))
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_construction_refused(cls, case):
    kwargs, make, exc, name = CONSTRUCTION[case]
    assert_construction_refused(cls, make() if make else _params(), kwargs, exc, name)


@pytest.mark.skipif(GPU, reason="Triton runs CUDA tensors here")
def test_triton_backend_needs_gpu_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(registry.BackendUnavailableError, match="triton"):
        AdamW(_params(), backend="triton")


@pytest.mark.parametrize("env", ["bogus", "cuda"] if not GPU else ["bogus"])
def test_bad_dlopt_backend_env(monkeypatch, env):
    monkeypatch.setenv("DLOPT_BACKEND", env)
    registry.clear_cache()
    try:
        with pytest.raises(ValueError, match="DLOPT_BACKEND" if env == "bogus" else "cuda"):
            AdamW(_params())
    finally:
        registry.clear_cache()


# ------------------------------------------------------------- refused later on


def _trained(cls=AdamW, n_groups=2, **kw):
    params = _params() + _params()
    per = len(params) // n_groups
    opt = cls([{"params": params[i * per:(i + 1) * per]} for i in range(n_groups)], lr=0.01, **kw)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt, params


BAD_GROUPS = {
    "lr_negative": (lambda: {"params": _params(), "lr": -1.0}, ValueError, "lr"),
    "betas": (lambda: {"params": _params(), "betas": (0.9, 1.0)}, ValueError, "betas"),
    "int_param": (lambda: {"params": INT_P()}, TypeError, "params"),
    "backend": (lambda: {"params": _params(), "backend": "bogus"}, ValueError, "backend"),
    "sr_fp16": (lambda: {"params": _params(torch.float16), "stochastic_rounding": True},
                ValueError, "stochastic_rounding"),
}


@pytest.mark.parametrize("case", list(BAD_GROUPS))
def test_add_param_group_refused_leaves_optimizer_unchanged(case):
    opt, params = _trained()
    make, exc, name = BAD_GROUPS[case]
    group = make()
    before = snapshot(params, opt)
    with pytest.raises(exc, match=rf"\b{name}"):
        opt.add_param_group(group)
    assert_unchanged(before, params, opt)
    opt.step()  # and it still works


def test_duplicate_param_group_refused():
    opt, params = _trained()
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [params[0]]})
    assert_unchanged(before, params, opt)


@pytest.mark.parametrize("where", ["first_group", "second_group"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_sparse_grad_refused_at_step(cls, where):
    """No group is stepped and no state is created when any grad is sparse."""
    opt, params = _trained(cls)
    for p in params:
        p.grad = torch.randn_like(p)
    victim = params[0] if where == "first_group" else params[-1]
    victim.grad = victim.grad.to_sparse()
    before = snapshot(params, opt)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert_unchanged(before, params, opt)
    # a fresh optimizer: no state is created either
    fresh = cls(params)
    with pytest.raises(TypeError, match="sparse"):
        fresh.step()
    assert len(fresh.state) == 0


def test_unknown_backend_set_on_a_group_refused_at_step():
    opt, params = _trained()
    extra = nn.Parameter(torch.randn(5))
    opt.add_param_group({"params": [extra]})
    opt.param_groups[-1]["backend"] = "bogus"
    for p in params + [extra]:
        p.grad = torch.randn_like(p)
    before = snapshot(params + [extra], opt)
    with pytest.raises(ValueError, match="backend"):
        opt.step()
    assert_unchanged(before, params + [extra], opt)


def test_load_state_dict_mismatch_refused():
    opt, params = _trained()
    other, _ = _trained(n_groups=1)
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match="parameter group"):
        opt.load_state_dict(other.state_dict())
    assert_unchanged(before, params, opt)


# ------------------------------------------------------------ odd input, as torch


def _twins(params):
    """Detached copies of `params` (and their grads) for the torch twin."""
    ref_ps = [nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, ref_ps):
        if p.grad is not None:
            q.grad = p.grad.clone()
    return ref_ps


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_and_inf_grads_propagate_like_torch(backend, dtype):
    """torch.optim does not check grads: a NaN grad element makes that param element
    (and its states) NaN, inf makes it NaN (inf / inf); every other element is
    updated normally. Then one more, clean step."""
    params = [nn.Parameter(torch.randn(257).to(dtype)), nn.Parameter(torch.randn(4, 5).to(dtype))]
    ref_ps = [nn.Parameter(p.detach().clone()) for p in params]
    ours = AdamW(params, lr=0.01, amsgrad=True, backend=backend)
    ref = torch.optim.AdamW(ref_ps, lr=0.01, amsgrad=True, foreach=False)
    for step in range(2):
        grads = [torch.randn_like(p) for p in params]
        if step == 0:
            grads[0][3], grads[0][100], grads[0][200] = NAN, float("inf"), -float("inf")
            grads[1][2, 1] = NAN
        for p, q, g in zip(params, ref_ps, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(params, ref_ps):
            assert torch.equal(p.isnan(), q.isnan())
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                assert torch.equal(ours.state[p][key].isnan(), ref.state[q][key].isnan()), key
            if dtype == torch.float32:
                torch.testing.assert_close(p.detach(), q.detach(), equal_nan=True, **tol(dtype))
    assert params[0].isnan().sum() == 3 and params[1].isnan().sum() == 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_size_and_0dim_params_like_torch(backend):
    shapes = [(0,), (), (3, 0), (5,), ()]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref_ps = [nn.Parameter(p.detach().clone()) for p in params]
    ours = Adam(params, lr=0.01, weight_decay=0.1, amsgrad=True, backend=backend)
    ref = torch.optim.Adam(ref_ps, lr=0.01, weight_decay=0.1, amsgrad=True, foreach=False)
    for _ in range(3):
        for p, q in zip(params, ref_ps):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(params, ref_ps):
        assert p.shape == q.shape
        torch.testing.assert_close(p.detach(), q.detach(), **tol(torch.float32))
        assert float(ours.state[p]["step"]) == float(ref.state[q]["step"]) == 3
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert ours.state[p][key].shape == p.shape
            torch.testing.assert_close(ours.state[p][key], ref.state[q][key], **tol(torch.float32))


def _layout_cases():
    """name -> () -> (param, a function making a fresh grad with the case's layout)."""
    return {
        "transposed_param": lambda: (nn.Parameter(torch.randn(7, 5).t()),
                                     lambda: torch.randn(5, 7)),
        "transposed_grad": lambda: (nn.Parameter(torch.randn(5, 7)),
                                    lambda: torch.randn(7, 5).t()),
        "both_transposed": lambda: (nn.Parameter(torch.randn(7, 5).t()),
                                    lambda: torch.randn(7, 5).t()),
        # every other column of a bigger tensor: not dense
        "strided_param": lambda: (nn.Parameter(torch.randn(6, 10)[:, ::2]),
                                  lambda: torch.randn(6, 5)),
        "expanded_grad": lambda: (nn.Parameter(torch.randn(5, 7)),  # stride 0
                                  lambda: torch.randn(1, 7).expand(5, 7)),
        "channels_last_param": lambda: (
            nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)),
            lambda: torch.randn(2, 3, 4, 5)),
    }


LAYOUTS = _layout_cases()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_params_and_grads_like_torch(backend, layout):
    """Compared with torch's for-loop and foreach AdamW, which are right here (torch
    2.13's fused CPU AdamW walks param and grad memory in storage order and silently
    mis-updates a param whose grad has other strides)."""
    p, make_grad = LAYOUTS[layout]()
    strides = p.stride()
    ours = AdamW([p], lr=0.01, weight_decay=0.1, amsgrad=True, backend=backend)
    refs = []
    for foreach in (False, True):
        q = nn.Parameter(p.detach().clone())
        refs.append((q, torch.optim.AdamW([q], lr=0.01, weight_decay=0.1, amsgrad=True,
                                          foreach=foreach)))
    for _ in range(3):
        g = make_grad()
        grad_before = g.clone()
        p.grad = g
        ours.step()
        assert torch.equal(p.grad, grad_before)  # grads are read-only
        for q, opt in refs:
            q.grad = g.clone()
            opt.step()
    assert p.stride() == strides, "the param keeps its layout"
    for q, opt in refs:
        torch.testing.assert_close(p.detach(), q.detach(), **tol(torch.float32))
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(ours.state[p][key], opt.state[q][key], **tol(torch.float32))


def test_meta_params_alongside_cpu_params_like_torch():
    """A param on the meta device holds no data; torch's step leaves it be and updates
    the others. Ours does the same (no error, no effect on the CPU params)."""
    cpu = _params()
    meta = nn.Parameter(torch.empty(3, device="meta"))
    meta.grad = torch.empty(3, device="meta")
    ref_cpu = _twins(cpu)
    ours = AdamW(cpu + [meta], lr=0.01)
    ref_meta = nn.Parameter(torch.empty(3, device="meta"))
    ref_meta.grad = torch.empty(3, device="meta")
    ref = torch.optim.AdamW(ref_cpu + [ref_meta], lr=0.01, foreach=False)
    ours.step()
    ref.step()
    for p, q in zip(cpu, ref_cpu):
        torch.testing.assert_close(p.detach(), q.detach(), **tol(torch.float32))
    assert meta.device.type == "meta" and meta.shape == (3,)
