"""dlopt_kernels.optim.Lion (no torch.optim twin): step by step against the float64
oracle from the paper's equations (tests/reference.py lion_float64), param groups, LR
schedulers, torch.compile of the step, state_dict round trips, GradScaler, master
weights, stochastic rounding, bad input, and a training check against a plain torch
Lion. Grads are drawn with |g| in [0.25, 0.5] where a test compares signs step by step
(see tests/ops/test_optim_lion.py: this keeps every |c| well away from 0).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import CPU_BACKENDS
from optim_twin_helpers import (FP32, assert_sr_drift_unbiased, assert_unchanged,
                                check_checkpoint_resumes_exactly, check_compiled_step_matches_eager,
                                check_construction_case, check_trains_like, clone_params,
                                construction_cases, make_params, mlp, set_grads, snapshot, sr_drift)
from reference import lion_float64
from tolerances import sr_bound

from dlopt_kernels.backends import registry
from dlopt_kernels.optim import Lion

# many-step tests skip the Triton interpreter (one launch per tensor per step costs
# ~20 ms there); tests/ops/test_optim_lion.py covers that backend's maths
NOT_INTERPRETED = [b for b in CPU_BACKENDS if b != "triton"]


def lion_grads(params, scale=1.0):
    out = []
    for p in params:
        mag = torch.empty(p.shape).uniform_(0.25, 0.5)
        sign = torch.where(torch.rand(p.shape) < 0.5, -1.0, 1.0)
        out.append((mag * sign * scale).to(p.dtype))
    return out


class Oracle:
    """The float64 oracle kept alongside an optimizer: per param, (param, exp_avg)."""

    def __init__(self, params):
        self.p = [p.detach().double().clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.p]

    def step(self, i, grad, lr, betas, weight_decay, maximize):
        self.p[i], self.m[i], _ = lion_float64(self.p[i], [grad], lr=lr, betas=betas,
                                               weight_decay=weight_decay, maximize=maximize,
                                               exp_avg=self.m[i])


def run_against_oracle(opt, params, n_steps, grad_scales=(1.0,), skip=()):
    """Steps `opt` with fresh grads and the oracle alongside (hyperparameters read from
    each param's group); compares params, exp_avg and step after every step. Params
    whose index is in `skip` get no grad."""
    oracle = Oracle(params)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for k in range(n_steps):
        grads = lion_grads(params, grad_scales[k % len(grad_scales)])
        for i in skip:
            grads[i] = None
        set_grads(params, grads)
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                assert p not in opt.state or "exp_avg" not in opt.state[p]
                continue
            grp = group_of[id(p)]
            oracle.step(i, g, float(grp["lr"]), tuple(float(b) for b in grp["betas"]),
                        grp["weight_decay"], grp["maximize"])
            torch.testing.assert_close(p.detach().double(), oracle.p[i], **FP32)
            torch.testing.assert_close(opt.state[p]["exp_avg"].double(), oracle.m[i], **FP32)
    return oracle


CONFIGS = {
    "default": dict(),
    "lr_wd": dict(lr=0.01, weight_decay=0.3),
    "maximize_betas": dict(lr=0.01, betas=(0.5, 0.9), maximize=True, weight_decay=0.1),
    "tensor_lr": dict(lr=torch.tensor(0.02), weight_decay=0.1),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_oracle(backend, config):
    params = make_params()
    opt = Lion(params, **copy.deepcopy(CONFIGS[config]), backend=backend)
    run_against_oracle(opt, params, 4, grad_scales=(1.0, 3.0, 0.1, 0.5))
    assert all(float(opt.state[p]["step"]) == 4 for p in params)
    assert set(opt.state[params[0]]) == {"step", "exp_avg"}


def test_defaults():
    opt = Lion([nn.Parameter(torch.zeros(2))])
    assert opt.defaults["lr"] == 1e-4 and opt.defaults["betas"] == (0.9, 0.99)
    assert opt.defaults["weight_decay"] == 0.0 and opt.defaults["maximize"] is False
    assert opt.defaults["backend"] == "auto"


def test_param_groups_and_params_without_grads():
    params = make_params()
    groups = [{"params": params[:2]},
              {"params": params[2:4], "lr": 0.03, "betas": (0.5, 0.9)},
              {"params": params[4:], "weight_decay": 0.2, "maximize": True}]
    opt = Lion(groups, lr=0.01)
    run_against_oracle(opt, params, 3, skip=(1,))
    assert params[1] not in opt.state


def test_add_param_group():
    params = make_params()
    opt = Lion(params[:3], lr=0.01, weight_decay=0.1)
    opt.add_param_group({"params": params[3:], "lr": 0.05, "betas": (0.8, 0.9)})
    assert opt.param_groups[1]["weight_decay"] == 0.1
    assert opt.param_groups[1]["backend"] == "auto"
    run_against_oracle(opt, params, 2)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_lr_scheduler(tensor_lr):
    """A scheduler changes lr between steps; every step reads it from the group."""
    params = make_params()
    lr = torch.tensor(0.01) if tensor_lr else 0.01
    opt = Lion(params, lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    oracle = Oracle(params)
    prev = math.inf
    for _ in range(4):
        grads = lion_grads(params)
        set_grads(params, grads)
        used = float(opt.param_groups[0]["lr"])
        assert used < prev
        prev = used
        opt.step()
        sched.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            oracle.step(i, g, used, (0.9, 0.99), 0.1, False)
            torch.testing.assert_close(p.detach().double(), oracle.p[i], **FP32)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == tensor_lr


def test_closure_and_zero_grad():
    params = make_params()
    opt = Lion(params, lr=0.01)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = sum(p.square().sum() for p in params)
        loss.backward()
        return loss

    with torch.no_grad():  # step enables grad for the closure, as torch does
        loss = opt.step(closure)
    assert len(calls) == 1 and loss.requires_grad
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    before = [p.detach().clone() for p in params]
    assert opt.step() is None  # no grads: nothing moves
    assert all(torch.equal(p, q) for p, q in zip(params, before))


# ----------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_step_matches_eager(backend):
    """Bit for bit with eager (an fp32 group and a bf16 master-weights group), no
    recompile when the (tensor) lr changes (optim_twin_helpers)."""
    check_compiled_step_matches_eager(lambda m: Lion(
        [{"params": m[0].parameters()}, {"params": m[2].parameters(), "master_weights": True}],
        lr=torch.tensor(0.01), weight_decay=0.1, backend=backend))


# ------------------------------------------------------------------------ state_dict


@pytest.mark.parametrize("dtype,mode", [(torch.float32, None), (torch.bfloat16, "master_weights"),
                                        (torch.bfloat16, "stochastic_rounding"),
                                        (torch.float16, None)],
                         ids=["fp32", "bf16_master", "bf16_sr", "fp16"])
def test_checkpoint_roundtrip_resumes_exactly(dtype, mode):
    """state_dict -> torch.save/load -> a fresh Lion (other hyperparameters): the
    groups' hyperparameters and every state tensor come back at its dtype, and
    training continues bit for bit."""
    extra = {mode: True} if mode else {}
    groups = lambda ps, lr: [{"params": ps[:2]}, {"params": ps[2:], "lr": lr}]  # noqa: E731
    _, resumed, sd = check_checkpoint_resumes_exactly(
        lambda ps: Lion(groups(ps, 0.02), lr=0.01, weight_decay=0.1, **extra),
        lambda ps: Lion(groups(ps, 0.5), lr=0.3, **extra), make_params(dtype=dtype),
        fp32_states=False, grads=lion_grads, reseed=True)
    master = {"master_param"} if mode == "master_weights" else set()
    assert all(set(st) == {"step", "exp_avg"} | master for st in sd["state"].values())
    assert resumed.param_groups[1]["lr"] == 0.02 and resumed.param_groups[0]["weight_decay"] == 0.1


# ----------------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler(backend):
    """torch.amp.GradScaler hands our step grad_scale / found_inf: the scaled grads give
    exactly the step on unscaled grads (power-of-two scales divide exactly), and a step
    with an inf grad changes nothing (step count included)."""
    model = mlp()
    params = list(model.parameters())
    twin = clone_params(params)
    ours = Lion(params, lr=0.01, weight_decay=0.1, backend=backend)
    plain = Lion(twin, lr=0.01, weight_decay=0.1, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=2)
    for it in range(5):
        x = torch.randn(5, 8)
        ours.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        scale = scaler.get_scale()
        if it == 2:
            params[0].grad[0, 0] = float("inf")
            before = snapshot(params, ours)
        set_grads(twin, [p.grad / scale for p in params])
        scaler.step(ours)
        scaler.update()
        if it == 2:
            assert scaler.get_scale() == scale / 2
            assert_unchanged(before, params, ours)
            continue
        plain.step()
        for p, q in zip(params, twin):
            assert torch.equal(p, q)
            assert torch.equal(ours.state[p]["exp_avg"], plain.state[q]["exp_avg"])
    assert {float(ours.state[p]["step"]) for p in params} == {4.0}
    assert not hasattr(ours, "grad_scale") and not hasattr(ours, "found_inf")


# --------------------------------------------------- master weights, stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_master_weights(backend, dtype):
    """Low-precision params with an fp32 master copy: param == master rounded after every
    step, and the masters follow the float64 oracle as fp32 params would. fp32 params in
    the same optimizer get no master."""
    params = make_params(dtype=dtype) + [nn.Parameter(torch.randn(9))]
    oracle = Oracle(params)
    ours = Lion(params, lr=0.01, weight_decay=0.1, master_weights=True, backend=backend)
    for _ in range(3):
        grads = lion_grads(params)
        set_grads(params, grads)
        ours.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            oracle.step(i, g, 0.01, (0.9, 0.99), 0.1, False)
            st = ours.state[p]
            if p.dtype == torch.float32:
                assert "master_param" not in st
                torch.testing.assert_close(p.detach().double(), oracle.p[i], **FP32)
                continue
            master = st["master_param"]
            assert master.dtype == torch.float32 and st["exp_avg"].dtype == torch.float32
            assert torch.equal(p.detach(), master.to(dtype))
            torch.testing.assert_close(master.double(), oracle.p[i], **FP32)


@pytest.mark.parametrize("backend", NOT_INTERPRETED)
def test_stochastic_rounding_keeps_tiny_updates(backend):
    """Lion moves every element by exactly lr per step; far below half a bf16 ulp,
    round-to-nearest never moves the params (all stay 1.0), stochastic rounding moves
    them by the right amount on average."""
    n, n_steps, lr = 4096, 40, 1e-4

    def fp32_momentum_with_sr(opt, p, sr):
        assert opt.state[p]["exp_avg"].dtype == (torch.float32 if sr else torch.bfloat16)

    drift = sr_drift(lambda ps, sr: Lion(ps, lr=lr, stochastic_rounding=sr, backend=backend),
                     1.0, n=n, n_steps=n_steps, check=fp32_momentum_with_sr)
    assert_sr_drift_unbiased(drift, n, n_steps, lr)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_first_step_within_one_ulp(backend):
    params = make_params([(4097,), (5, 9), ()], dtype=torch.bfloat16)
    oracle = Oracle(params)
    ours = Lion(params, lr=1e-3, weight_decay=0.1, stochastic_rounding=True, backend=backend)
    grads = lion_grads(params)
    set_grads(params, grads)
    ours.step()
    for i, (p, g) in enumerate(zip(params, grads)):
        oracle.step(i, g, 1e-3, (0.9, 0.99), 0.1, False)
        want = oracle.p[i]
        assert ((p.detach().double() - want).abs() <= sr_bound(want)).all()
        assert "master_param" not in ours.state[p]


# ------------------------------------------------------------------------- bad input

CONSTRUCTION = construction_cases({
    "beta1_above_one": (dict(betas=(1.5, 0.99)), ValueError, "betas"),
    "beta2_negative": (dict(betas=(0.9, -0.1)), ValueError, "betas"),
    "betas_three": (dict(betas=(0.9, 0.99, 0.9)), TypeError, "betas"),
    "weight_decay_nan": (dict(weight_decay=float("nan")), ValueError, "weight_decay"),
    "maximize_not_bool": (dict(maximize=1), TypeError, "maximize"),
    # (kwargs, params factory, exc, name)
    "sr_fp16_params": (dict(stochastic_rounding=True),
                       lambda: make_params(dtype=torch.float16), ValueError,
                       "stochastic_rounding"),
    "int_params": (dict(), lambda: [torch.zeros(3, dtype=torch.int64)], TypeError, "params"),
    "complex_params": (dict(), lambda: [nn.Parameter(torch.randn(3, dtype=torch.complex64))],
                       TypeError, "params"),
    "empty_params": (dict(), lambda: [], ValueError, "param"),
})


@pytest.mark.parametrize("case", list(CONSTRUCTION))
def test_construction_refused(case):
    check_construction_case(Lion, CONSTRUCTION[case])


def test_bad_param_group_refused_and_optimizer_unchanged():
    params = make_params()
    opt = Lion(params[:2], lr=0.01)
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": params[2:], "betas": (0.9, 2.0)})
    assert len(opt.param_groups) == 1
    assert_unchanged(before, params, opt)


def test_sparse_grad_refused_before_anything_changes():
    params = make_params()
    opt = Lion(params, lr=0.01)
    set_grads(params, lion_grads(params))
    opt.step()
    set_grads(params, lion_grads(params))
    params[3].grad = params[3].grad.to_sparse()
    before = snapshot(params, opt)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert_unchanged(before, params, opt)


def test_unavailable_backend_env(monkeypatch):
    monkeypatch.setenv("DLOPT_BACKEND", "bogus")
    registry.clear_cache()
    try:
        with pytest.raises(ValueError, match="DLOPT_BACKEND"):
            Lion(make_params())
    finally:
        registry.clear_cache()


# ------------------------------------------------------------------ training check


class TorchLion(torch.optim.Optimizer):
    """A plain torch Lion (as lucidrains/lion-pytorch writes it): the training yardstick."""

    def __init__(self, params, lr, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(m.mul(b1).add(p.grad, alpha=1 - b1).sign_(), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


@pytest.mark.parametrize("backend", NOT_INTERPRETED)
def test_trains_like_plain_torch_lion(backend):
    """A small MLP fit to a random teacher (fixed data and init): ours reaches the plain
    torch Lion's loss (the runs differ only by rounding order), and the run has learned."""
    kwargs = dict(lr=3e-3, weight_decay=0.1)
    check_trains_like(lambda ps: Lion(ps, **kwargs, backend=backend),
                      lambda ps: TorchLion(ps, **kwargs))
