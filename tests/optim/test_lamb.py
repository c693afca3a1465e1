"""dlopt_kernels.optim.LAMB against the float64 LAMB written from the paper's equations
(tests/reference.py LambFloat64): step by step over backends and configurations, param
groups with global grad-norm clipping across them, torch.compile, state_dict, GradScaler,
master weights and stochastic rounding, bad arguments, and a training check.
Tolerances come from tests/tolerances.py only.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import CPU_BACKENDS
from optim_twin_helpers import (FP32, check_checkpoint_resumes_exactly,
                                check_compiled_step_matches_eager, make_params, mlp, rand_grads,
                                set_grads)
from reference import LambFloat64
from tolerances import TRAIN_LOSS_RTOL, sr_bound

from dlopt_kernels.optim import LAMB


def assert_matches_oracle(ours, params, oracle, tolerance=FP32):
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach().double(), oracle.params[i], **tolerance)
        st = ours.state[p]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(st["step"]) == oracle.t[i]
        torch.testing.assert_close(st["exp_avg"].double(), oracle.m[i], **tolerance)
        torch.testing.assert_close(st["exp_avg_sq"].double(), oracle.v[i], **tolerance)


CONFIGS = {
    "default": dict(),
    "lr_wd": dict(lr=0.02, weight_decay=0.1),
    "clip": dict(lr=0.02, max_grad_norm=1.0),
    "no_bias_correction": dict(bias_correction=False, weight_decay=0.0),
    "tensor_lr_betas_eps": dict(lr=torch.tensor(0.01), betas=(0.8, 0.99), eps=1e-4),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_oracle(backend, config):
    kwargs = copy.deepcopy(CONFIGS[config])
    params = make_params()
    okw = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    oracle = LambFloat64(params, **okw)
    ours = LAMB(params, backend=backend, **kwargs)
    for scale in (1.0, 3.0, 0.1, 0.5):
        grads = rand_grads(params, scale)
        set_grads(params, grads)
        ours.step()
        oracle.step(grads)
        assert_matches_oracle(ours, params, oracle)


def test_defaults():
    ours = LAMB([nn.Parameter(torch.zeros(2))])
    d = ours.defaults
    assert (d["lr"], d["betas"], d["eps"], d["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-6, 0.01)
    assert d["bias_correction"] is True and d["max_grad_norm"] is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_param_groups_clip_globally(backend):
    """max_grad_norm clips by the norm of the grads of every group together (apex), and
    each group keeps its own lr / weight decay."""
    params = make_params()
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.05, "weight_decay": 0.0}]
    ours = LAMB(groups, lr=0.01, max_grad_norm=0.5, backend=backend)
    oracles = [LambFloat64(params[:2], lr=0.01, max_grad_norm=0.5),
               LambFloat64(params[2:], lr=0.05, weight_decay=0.0, max_grad_norm=0.5)]
    for _ in range(3):
        grads = rand_grads(params, 2.0)
        set_grads(params, grads)
        ours.step()
        total = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]))
        factor = min(1.0, 0.5 / float(total))
        # each oracle clips by the global norm: give it pre-clipped grads, no own clipping
        for o, gs in ((oracles[0], grads[:2]), (oracles[1], grads[2:])):
            o.max_grad_norm = None
            o.step([g.double() * factor for g in gs])
    assert_matches_oracle(ours, params[:2], oracles[0])
    assert_matches_oracle(ours, params[2:], oracles[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_step_matches_eager(backend):
    """torch.compile(fullgraph=True) of the step (with clipping, a bf16 master-weights
    group and a tensor lr changed in place) gives the eager result bit for bit
    (optim_twin_helpers)."""
    check_compiled_step_matches_eager(lambda m: LAMB(
        [{"params": m[0].parameters()}, {"params": m[2].parameters(), "master_weights": True}],
        lr=torch.tensor(0.01), max_grad_norm=0.1, backend=backend), n_steps=3)


def test_state_dict_roundtrip():
    _, resumed, sd = check_checkpoint_resumes_exactly(
        lambda ps: LAMB(ps, lr=0.01, max_grad_norm=1.0), lambda ps: LAMB(ps, lr=0.5),
        make_params())
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert resumed.param_groups[0]["max_grad_norm"] == 1.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler(backend):
    """torch.amp.GradScaler: grads are unscaled in the kernel (the clipping norm too),
    and a step with an inf grad changes nothing at all."""
    model = mlp()
    params = list(model.parameters())
    ours = LAMB(params, lr=0.01, max_grad_norm=0.5, backend=backend)
    oracle = LambFloat64(params, lr=0.01, max_grad_norm=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=2)
    for it in range(4):
        ours.zero_grad()
        scale = scaler.get_scale()
        scaler.scale(model(torch.randn(5, 8)).square().mean()).backward()
        if it == 2:
            params[0].grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in params]
            state = copy.deepcopy(ours.state_dict()["state"])
        grads = [p.grad.clone() for p in params]
        scaler.step(ours)
        scaler.update()
        if it == 2:
            for p, q in zip(params, before):
                assert torch.equal(p, q)
            for i, st in ours.state_dict()["state"].items():
                for key, value in st.items():
                    assert torch.equal(value, state[i][key])
        else:
            oracle.step(grads, grad_scale=scale)
            assert_matches_oracle(ours, params, oracle)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_master_weights(backend, dtype):
    params = make_params(dtype=dtype) + [nn.Parameter(torch.randn(9))]
    ours = LAMB(params, lr=0.01, master_weights=True, max_grad_norm=1.0, backend=backend)
    oracle = LambFloat64([p.float() for p in params], lr=0.01, max_grad_norm=1.0)
    for _ in range(3):
        grads = rand_grads(params)
        set_grads(params, grads)
        ours.step()
        oracle.step([g.float() for g in grads])
    for i, p in enumerate(params):
        st = ours.state[p]
        if p.dtype == torch.float32:
            assert "master_param" not in st
            torch.testing.assert_close(p.detach().double(), oracle.params[i], **FP32)
            continue
        assert st["exp_avg"].dtype == torch.float32
        assert torch.equal(p.detach(), st["master_param"].to(dtype))
        torch.testing.assert_close(st["master_param"].double(), oracle.params[i], **FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_first_step_within_one_ulp(backend):
    params = make_params([(4097,), (5, 9), ()], dtype=torch.bfloat16)
    ours = LAMB(params, lr=1e-3, stochastic_rounding=True, backend=backend)
    oracle = LambFloat64([p.float() for p in params], lr=1e-3)
    grads = rand_grads(params)
    set_grads(params, grads)
    ours.step()
    oracle.step([g.float() for g in grads])
    for i, p in enumerate(params):
        st = ours.state[p]
        assert "master_param" not in st and st["exp_avg"].dtype == torch.float32
        want = oracle.params[i]
        assert ((p.detach().double() - want).abs() <= sr_bound(want)).all()


def test_params_without_grads_and_closure():
    params = make_params()
    ours = LAMB(params, lr=0.01)
    oracle = LambFloat64(params[:1] + params[2:], lr=0.01)
    for _ in range(2):
        grads = rand_grads(params)
        grads[1] = None

        def closure():
            set_grads(params, grads)
            return torch.tensor(1.5)

        assert float(ours.step(closure)) == 1.5
        oracle.step(grads[:1] + grads[2:])
    assert params[1] not in ours.state or len(ours.state[params[1]]) == 0
    assert_matches_oracle(ours, params[:1] + params[2:], oracle)


BAD = [
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(betas=(1.0, 0.999)), ValueError, "betas"),
    (dict(betas=(0.9,)), TypeError, "betas"),
    (dict(eps=-1e-6), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(bias_correction=1), TypeError, "bias_correction"),
    (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    (dict(max_grad_norm="1"), TypeError, "max_grad_norm"),
    (dict(backend="nope"), ValueError, "backend"),
    (dict(master_weights=True, stochastic_rounding=True), ValueError, "stochastic_rounding"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_arguments(kwargs, exc, name):
    params = make_params()
    before = [p.detach().clone() for p in params]
    with pytest.raises(exc, match=name):
        LAMB(params, **kwargs)
    if name != "stochastic_rounding":  # (the base class checks that pair at construction)
        opt = LAMB(params)
        with pytest.raises(exc, match=name):
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], **kwargs})
        assert len(opt.param_groups) == 1
    for p, q in zip(params, before):
        assert torch.equal(p, q)


def test_bad_step_inputs_change_nothing():
    params = make_params([(4,), (3,)])
    opt = LAMB(params, max_grad_norm=1.0)
    set_grads(params, rand_grads(params))
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    params[0].grad = torch.randn(4).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    params[0].grad_dtype = None  # torch refuses a grad of another dtype unless asked
    params[0].grad = torch.randn(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        opt.step()
    for p, q in zip(params, values):
        assert torch.equal(p, q)
    for i, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(value, before["state"][i][key])
    with pytest.raises(TypeError, match="complex"):
        LAMB([nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


def test_training_matches_reference():
    """A small MLP on a synthetic regression task, trained with ours (fp32) and with the
    float64 paper LAMB on a float64 twin of the model: same loss after N steps, and far
    below where it started."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(512, 16)
    w_true = torch.randn(16, 1)
    y = torch.tanh(x @ w_true) + 0.05 * torch.randn(512, 1)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    twin = copy.deepcopy(model).double()
    hp = dict(lr=0.01, weight_decay=0.01, max_grad_norm=1.0)
    ours = LAMB(model.parameters(), **hp)
    oracle = LambFloat64(list(twin.parameters()), **hp)
    losses = []
    for _ in range(60):
        ours.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        ours.step()
        twin.zero_grad()
        loss64 = (twin(x.double()) - y.double()).square().mean()
        loss64.backward()
        new = oracle.step([p.grad for p in twin.parameters()])
        with torch.no_grad():
            for p, q in zip(twin.parameters(), new):
                p.copy_(q)
        losses.append((loss.item(), loss64.item()))
    first, last = losses[0], losses[-1]
    assert last[0] < 0.3 * first[0], losses
    assert abs(last[0] - last[1]) <= TRAIN_LOSS_RTOL * last[1], last
