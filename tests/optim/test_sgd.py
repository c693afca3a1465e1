"""dlopt_kernels.optim.SGD as a drop-in for torch.optim.SGD: step by step against torch's
for-loop implementation (every constructor argument), the state layout (only
'momentum_buffer', none without momentum, no 'step'), state_dict both ways, param
groups, params whose first grad comes late, torch.compile of the step, GradScaler
(including an overflow on the very first momentum step), master weights, stochastic
rounding, bad input per argument, PyTorch's own optimizer test database and a small
training task. Tolerances come from tests/tolerances.py only.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import CPU_BACKENDS
from optim_twin_helpers import (FP32, assert_construction_refused, assert_refusals_documented,
                                assert_same_training, assert_unchanged, check_optim_db_error_input,
                                clone_params, make_params, mlp, optim_db_configs,
                                optim_db_error_inputs, rand_grads, roundtrip, run_optim_db_config,
                                set_grads, snapshot, train_regression, twin_run)
from tolerances import (SR_MAX_ULPS, TRAIN_LOSS_MAX_FRACTION, TRAIN_LOSS_RTOL, spacing, tol)

from dlopt_kernels.optim import SGD

TWIN = torch.optim.SGD

CONFIGS = {
    "default": dict(),
    "lr_wd": dict(lr=0.05, weight_decay=0.1),
    "momentum": dict(lr=0.01, momentum=0.9),
    "dampening_maximize": dict(lr=0.01, momentum=0.9, dampening=0.5, maximize=True),
    "nesterov_wd": dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1),
    "tensor_lr_tensor_wd": dict(lr=torch.tensor(0.02), momentum=0.5,
                                weight_decay=torch.tensor(0.05)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_torch(backend, config):
    kwargs = dict(copy.deepcopy(CONFIGS[config]), backend=backend)
    twin_run(SGD, TWIN, kwargs, make_params(), 4, grad_scales=[1.0, 3.0, 0.1, 0.5])


def test_defaults_and_state_layout_match_torch():
    p = [nn.Parameter(torch.zeros(2))]
    ours, ref = SGD(p), TWIN(p)
    for key, value in ref.defaults.items():
        assert ours.defaults[key] == value, key
    for momentum in (0.0, 0.9):
        params = make_params()
        ours, ref, _ = twin_run(SGD, TWIN, dict(momentum=momentum), params, 1)
        keys = {k for st in ours.state_dict()["state"].values() for k in st}
        assert keys == (set() if momentum == 0 else {"momentum_buffer"})
        if momentum == 0:
            assert len(ours.state) == 0 and ours.state_dict()["state"] == {}


# ----------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_step_matches_eager(backend):
    """The optimizer step under torch.compile(fullgraph=True) (forward and backward
    eager) gives the eager result bit for bit, with an fp32 group and a bf16
    master-weights Nesterov group, and does not recompile when the tensor lr changes."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = mlp()
    model[2].to(torch.bfloat16)
    twin = copy.deepcopy(model)

    def make(m):
        return SGD([{"params": m[0].parameters()},
                    {"params": m[2].parameters(), "master_weights": True, "nesterov": True}],
                   lr=torch.tensor(0.05), momentum=0.9, weight_decay=0.01, backend=backend)

    opt, opt_eager = make(model), make(twin)
    compiled_step = torch.compile(opt.step, fullgraph=True)
    graphs_before = counters["stats"]["unique_graphs"]
    for i in range(4):
        x = torch.randn(5, 8)
        for m, o, step in ((model, opt, compiled_step), (twin, opt_eager, opt_eager.step)):
            o.zero_grad()
            m[2](m[1](m[0](x)).bfloat16()).float().square().mean().backward()
            step()
            o.defaults["lr"].mul_(0.7)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q), f"step {i}"
        for p in model[2].parameters():
            assert torch.equal(p, opt.state[p]["master_param"].to(p.dtype))
    assert counters["stats"]["unique_graphs"] - graphs_before <= 2


# ------------------------------------------------------------------------ state_dict


def _two_groups(params, momentum):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "momentum": momentum}]


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["no_momentum", "momentum"])
def test_torch_checkpoint_into_ours(momentum):
    params = make_params()
    ref = TWIN(_two_groups(params, momentum), lr=0.01, momentum=0.5, weight_decay=0.1)
    for _ in range(3):
        set_grads(params, rand_grads(params))
        ref.step()
    sd = roundtrip(ref.state_dict())
    mine = clone_params(params)
    ours = SGD(_two_groups(mine, 0.3), lr=0.5)  # hparams come from sd
    ours.load_state_dict(sd)
    for g_ours, g_ref in zip(ours.param_groups, ref.param_groups):
        for key in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"):
            assert g_ours[key] == g_ref[key], key
    assert_same_training(ours, mine, ref, params)
    twin_run(SGD, TWIN, {}, mine, 3, ours=ours, ref=ref, ps_ref=params)


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["no_momentum", "momentum"])
def test_ours_checkpoint_into_torch(momentum):
    params = make_params()
    ours = SGD(_two_groups(params, momentum), lr=0.01, momentum=0.5, nesterov=True)
    for _ in range(3):
        set_grads(params, rand_grads(params))
        ours.step()
    sd = roundtrip(ours.state_dict())
    assert all("step" not in st for st in sd["state"].values())
    theirs = clone_params(params)
    ref = TWIN(_two_groups(theirs, 0.1), lr=0.5, foreach=False)
    ref.load_state_dict(sd)
    assert_same_training(ours, params, ref, theirs)
    twin_run(SGD, TWIN, {}, params, 3, ours=ours, ref=ref, ps_ref=theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_checkpoint_roundtrip(dtype):
    params = make_params(dtype=dtype)
    ours = SGD(params, lr=0.01, momentum=0.9, master_weights=True)
    for _ in range(2):
        set_grads(params, rand_grads(params))
        ours.step()
    sd = ours.state_dict()
    for i in range(len(params)):
        assert sd["state"][i]["master_param"].dtype == torch.float32
        assert sd["state"][i]["momentum_buffer"].dtype == torch.float32
    mine = clone_params(params)
    resumed = SGD(mine, lr=0.3, momentum=0.9, master_weights=True)
    resumed.load_state_dict(roundtrip(sd))
    for _ in range(2):
        grads = rand_grads(params)
        set_grads(params, grads)
        set_grads(mine, grads)
        ours.step()
        resumed.step()
    for p, q in zip(params, mine):
        assert torch.equal(p, q)
        for key in ("master_param", "momentum_buffer"):
            assert torch.equal(ours.state[p][key], resumed.state[q][key]), key


# -------------------------------------------------------- groups, late grads, closures


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_param_groups_and_late_grads_match_torch(backend):
    """Groups with no momentum, heavy ball and Nesterov; a param without a grad gets no
    state; one whose first grad comes at step 3 starts its buffer then (= its grad)."""
    params = make_params()
    groups = [{"params": params[:2], "momentum": 0.0},
              {"params": params[2:4], "lr": 0.03, "momentum": 0.9, "dampening": 0.2},
              {"params": params[4:], "nesterov": True, "weight_decay": 0.2, "maximize": True}]
    ours = SGD(groups, lr=0.01, momentum=0.8, backend=backend)
    ref = TWIN([dict(g, params=clone_params(g["params"])) for g in groups], lr=0.01,
               momentum=0.8, foreach=False)
    ps_ref = [p for g in ref.param_groups for p in g["params"]]
    for k in range(4):
        grads = rand_grads(params)
        grads[1] = None
        if k < 2:
            grads[3] = None
        set_grads(params, grads)
        set_grads(ps_ref, grads)
        ours.step()
        ref.step()
        assert_same_training(ours, params, ref, ps_ref)
    assert params[1] not in ours.state and params[0] not in ours.state


def test_add_param_group_and_closure_match_torch():
    model, twin = mlp(), None
    twin = copy.deepcopy(model)
    ours = SGD(model[0].parameters(), lr=0.05, momentum=0.9)
    ref = TWIN(twin[0].parameters(), lr=0.05, momentum=0.9, foreach=False)
    for k in range(4):
        if k == 2:
            ours.add_param_group({"params": model[2].parameters(), "nesterov": True})
            ref.add_param_group({"params": twin[2].parameters(), "nesterov": True})
        x, y = torch.randn(6, 8), torch.randn(6, 4)

        def closure(m=model, o=ours):
            o.zero_grad()
            loss = (m(x) - y).square().mean()
            loss.backward()
            return loss

        def closure_ref():
            ref.zero_grad()
            loss = (twin(x) - y).square().mean()
            loss.backward()
            return loss

        torch.testing.assert_close(ours.step(closure), ref.step(closure_ref), **FP32)
        assert_same_training(ours, list(model.parameters()), ref, list(twin.parameters()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_params_like_torch(backend):
    """Zero-size and 0-dim params, a transposed param and a transposed grad."""
    params = [nn.Parameter(torch.randn(s)) for s in [(0,), (), (3, 0), (5,)]]
    params.append(nn.Parameter(torch.randn(7, 5).t()))
    params.append(nn.Parameter(torch.randn(5, 7)))
    ps_ref = clone_params(params)
    ours = SGD(params, lr=0.01, momentum=0.9, weight_decay=0.1, backend=backend)
    ref = TWIN(ps_ref, lr=0.01, momentum=0.9, weight_decay=0.1, foreach=False)
    for _ in range(3):
        grads = rand_grads(params)
        grads[-1] = torch.randn(7, 5).t()
        set_grads(params, grads)
        set_grads(ps_ref, grads)
        ours.step()
        ref.step()
        assert_same_training(ours, params, ref, ps_ref)
    assert params[4].stride() == (1, 5)


# ----------------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_matches_torch(backend):
    """GradScaler hands ours grad_scale / found_inf; torch's for-loop SGD gets grads
    unscaled by the scaler and its step skipped on overflow. The overflow comes on the
    very first step (no momentum buffer may exist afterwards) and again later."""
    model = mlp()
    twin = copy.deepcopy(model)
    ours = SGD(model.parameters(), lr=0.05, momentum=0.9, dampening=0.1, backend=backend)
    ref = TWIN(twin.parameters(), lr=0.05, momentum=0.9, dampening=0.1, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=2)
               for _ in range(2)]
    for it in range(6):
        x = torch.randn(5, 8)
        for m, o, sc in ((model, ours, scalers[0]), (twin, ref, scalers[1])):
            o.zero_grad()
            sc.scale(m(x).square().mean()).backward()
            if it in (0, 3):
                next(m.parameters()).grad[0, 0] = float("inf")
            before = snapshot(list(m.parameters()), o) if (o is ours and it in (0, 3)) else None
            sc.step(o)
            sc.update()
            if before is not None:
                assert_unchanged({k: before[k] for k in ("params", "state")},
                                 list(m.parameters()), o)
        if it == 0:
            assert len(ours.state) == 0
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_same_training(ours, list(model.parameters()), ref, list(twin.parameters()))


# --------------------------------------------------- master weights, stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_master_weights(backend, dtype):
    params = make_params(dtype=dtype) + [nn.Parameter(torch.randn(9))]
    ref_ps = [nn.Parameter(p.detach().float().clone()) for p in params]
    ours = SGD(params, lr=0.01, momentum=0.9, weight_decay=0.1, master_weights=True,
               backend=backend)
    ref = TWIN(ref_ps, lr=0.01, momentum=0.9, weight_decay=0.1, foreach=False)
    for _ in range(3):
        grads = rand_grads(params)
        set_grads(params, grads)
        set_grads(ref_ps, [g.float() for g in grads])
        ours.step()
        ref.step()
        for p, q in zip(params, ref_ps):
            st = ours.state[p]
            if p.dtype == torch.float32:
                assert "master_param" not in st
                torch.testing.assert_close(p.detach(), q.detach(), **FP32)
                continue
            assert torch.equal(p.detach(), st["master_param"].to(dtype))
            torch.testing.assert_close(st["master_param"], q.detach(), **FP32)
            torch.testing.assert_close(st["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                       **FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_first_step_within_one_ulp(backend):
    params = make_params([(4097,), (5, 9), ()], dtype=torch.bfloat16)
    ref_ps = [nn.Parameter(p.detach().float().clone()) for p in params]
    ours = SGD(params, lr=1e-3, momentum=0.9, stochastic_rounding=True, backend=backend)
    ref = TWIN(ref_ps, lr=1e-3, momentum=0.9, foreach=False)
    grads = rand_grads(params)
    set_grads(params, grads)
    set_grads(ref_ps, [g.float() for g in grads])
    ours.step()
    ref.step()
    rtol, atol = FP32["rtol"], FP32["atol"]
    for p, q in zip(params, ref_ps):
        st = ours.state[p]
        assert "master_param" not in st and st["momentum_buffer"].dtype == torch.float32
        want = q.detach().double()
        bound = SR_MAX_ULPS * spacing(torch.bfloat16, want) + atol + rtol * want.abs()
        assert ((p.detach().double() - want).abs() <= bound).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_keeps_tiny_updates(backend):
    """Plain SGD updates of 1/8 of a bf16 ulp: round-to-nearest never moves the params,
    stochastic rounding moves them by about the right amount on average."""
    n, n_steps, lr = 4096, 16, 2.0**-11 / 8
    drift = {}
    for sr in (False, True):
        p = nn.Parameter(torch.ones(n, dtype=torch.bfloat16) * 1.5)
        ours = SGD([p], lr=lr, stochastic_rounding=sr, backend=backend)
        for _ in range(n_steps):
            p.grad = torch.ones_like(p)
            ours.step()
        drift[sr] = float(p.detach().double().mean()) - 1.5
    assert drift[False] == 0.0
    assert -1.5 * n_steps * lr <= drift[True] <= -0.5 * n_steps * lr, drift


# ------------------------------------------------------------------------- bad input

CONSTRUCTION = {
    "lr_negative": (dict(lr=-1e-3), ValueError, "lr"),
    "lr_nan": (dict(lr=float("nan")), ValueError, "lr"),
    "lr_tensor_two_elements": (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "lr"),
    "lr_string": (dict(lr="0.01"), TypeError, "lr"),
    "momentum_negative": (dict(momentum=-0.5), ValueError, "momentum"),
    "momentum_nan": (dict(momentum=float("nan")), ValueError, "momentum"),
    "momentum_string": (dict(momentum="0.9"), TypeError, "momentum"),
    "dampening_nan": (dict(momentum=0.9, dampening=float("nan")), ValueError, "dampening"),
    "dampening_none": (dict(momentum=0.9, dampening=None), TypeError, "dampening"),
    "weight_decay_negative": (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    "weight_decay_tensor_negative": (dict(weight_decay=torch.tensor(-0.1)), ValueError,
                                     "weight_decay"),
    "nesterov_without_momentum": (dict(nesterov=True), ValueError, "nesterov"),
    "nesterov_with_dampening": (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
                                "nesterov"),
    "nesterov_not_bool": (dict(nesterov=1, momentum=0.9), TypeError, "nesterov"),
    "maximize_not_bool": (dict(maximize="no"), TypeError, "maximize"),
    "differentiable": (dict(differentiable=True), ValueError, "differentiable"),
    "foreach_and_fused": (dict(foreach=True, fused=True), ValueError, "fused"),
    "master_and_sr": (dict(master_weights=True, stochastic_rounding=True), ValueError,
                      "stochastic_rounding"),
    "unknown_backend": (dict(backend="bogus"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", list(CONSTRUCTION))
def test_construction_refused(case):
    kwargs, exc, name = CONSTRUCTION[case]
    params = make_params()
    set_grads(params, rand_grads(params))
    assert_construction_refused(SGD, params, kwargs, exc, name)


def test_refused_step_and_group_change_nothing():
    params = make_params()
    opt = SGD(params[:3], lr=0.01, momentum=0.9)
    for _ in range(2):
        set_grads(params, rand_grads(params))
        opt.step()
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match="dampening"):
        opt.add_param_group({"params": params[3:], "dampening": float("nan")})
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group({"params": params[3:], "momentum": -1.0})
    assert_unchanged(before, params, opt)
    params[1].grad = params[1].grad.to_sparse()
    before = snapshot(params, opt)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert_unchanged(before, params, opt)


# --------------------------------------------------- PyTorch's optimizer test database

REFUSED = {"differentiable": "a fused in-place step has no autograd graph; use torch.optim"}


@pytest.mark.parametrize("kwargs", optim_db_configs("SGD"))
def test_optim_db_config(kwargs):
    run_optim_db_config(SGD, TWIN, kwargs, REFUSED)


def test_refusals_are_documented():
    assert_refusals_documented(REFUSED)


@pytest.mark.parametrize("error_input", optim_db_error_inputs("SGD"))
def test_optim_db_error_input(error_input):
    check_optim_db_error_input(SGD, error_input)


# ------------------------------------------------------------------- training check


@pytest.mark.parametrize("kwargs", [dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
                                    dict(lr=0.2)], ids=["nesterov", "plain"])
def test_trains_like_torch(kwargs):
    ours, scale = train_regression(lambda ps: SGD(ps, **kwargs))
    theirs, _ = train_regression(lambda ps: TWIN(ps, **kwargs, foreach=False))
    assert abs(ours - theirs) <= TRAIN_LOSS_RTOL * theirs
    assert ours <= TRAIN_LOSS_MAX_FRACTION * scale, (ours, scale)
