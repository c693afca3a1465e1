"""dlopt_kernels.optim.RMSprop as a drop-in for torch.optim.RMSprop: step by step against
torch's for-loop implementation (every constructor argument, torch's positional order),
the state layout ('step', 'square_avg', 'momentum_buffer' only with momentum > 0,
'grad_avg' only when centered), state_dict both ways, param groups, torch.compile of the
step, GradScaler (torch's RMSprop lets the scaler unscale and skip; ours takes
grad_scale / found_inf), master weights, stochastic rounding, bad input per argument,
PyTorch's own optimizer test database and a small training task.
Tolerances come from tests/tolerances.py only.
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
from tolerances import SR_MAX_ULPS, TRAIN_LOSS_MAX_FRACTION, TRAIN_LOSS_RTOL, spacing

from dlopt_kernels.optim import RMSprop

TWIN = torch.optim.RMSprop

CONFIGS = {
    "default": dict(),
    "alpha_eps_wd": dict(lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.1),
    "momentum": dict(lr=0.01, momentum=0.9),
    "centered_maximize": dict(lr=0.01, centered=True, maximize=True),
    "all": dict(lr=torch.tensor(0.01), momentum=0.5, centered=True, weight_decay=0.1,
                alpha=0.95),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_torch(backend, config):
    kwargs = dict(copy.deepcopy(CONFIGS[config]), backend=backend)
    twin_run(RMSprop, TWIN, kwargs, make_params(), 4, grad_scales=[1.0, 3.0, 0.3, 0.5])


def test_defaults_positional_order_and_state_layout_match_torch():
    p = [nn.Parameter(torch.zeros(2))]
    ours, ref = RMSprop(p), TWIN(p)
    for key, value in ref.defaults.items():
        assert ours.defaults[key] == value, key
    # torch's arguments are positional: lr, alpha, eps, weight_decay, momentum, centered
    ours, ref = RMSprop(p, 0.1, 0.8, 1e-4, 0.2, 0.3, True), TWIN(p, 0.1, 0.8, 1e-4, 0.2, 0.3, True)
    assert {k: ours.defaults[k] for k in ref.defaults} == ref.defaults
    for kw, keys in ((dict(), {"step", "square_avg"}),
                     (dict(momentum=0.9), {"step", "square_avg", "momentum_buffer"}),
                     (dict(centered=True), {"step", "square_avg", "grad_avg"})):
        params = make_params()
        ours, _, _ = twin_run(RMSprop, TWIN, kw, params, 1)
        assert all(set(st) == keys for st in ours.state_dict()["state"].values())


# ----------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_step_matches_eager(backend):
    """The optimizer step under torch.compile(fullgraph=True) gives the eager result bit
    for bit (fp32 group, bf16 master-weights centered group) and does not recompile when
    the tensor lr changes."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = mlp()
    model[2].to(torch.bfloat16)
    twin = copy.deepcopy(model)

    def make(m):
        return RMSprop([{"params": m[0].parameters()},
                        {"params": m[2].parameters(), "master_weights": True, "centered": True}],
                       lr=torch.tensor(0.01), momentum=0.9, weight_decay=0.01, backend=backend)

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


def _two_groups(params, centered):
    return [{"params": params[:2]},
            {"params": params[2:], "lr": 0.02, "centered": centered, "momentum": 0.5}]


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_torch_checkpoint_into_ours(centered):
    params = make_params()
    ref = TWIN(_two_groups(params, centered), lr=0.01, weight_decay=0.1)
    for _ in range(3):
        set_grads(params, rand_grads(params))
        ref.step()
    sd = roundtrip(ref.state_dict())
    mine = clone_params(params)
    ours = RMSprop(_two_groups(mine, False), lr=0.5)  # hparams come from sd
    ours.load_state_dict(sd)
    for g_ours, g_ref in zip(ours.param_groups, ref.param_groups):
        for key in ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize"):
            assert g_ours[key] == g_ref[key], key
    assert_same_training(ours, mine, ref, params)
    twin_run(RMSprop, TWIN, {}, mine, 3, ours=ours, ref=ref, ps_ref=params)
    assert all(float(ours.state[p]["step"]) == 6 for p in mine)


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_ours_checkpoint_into_torch(centered):
    params = make_params()
    ours = RMSprop(_two_groups(params, centered), lr=0.01, maximize=True)
    for _ in range(3):
        set_grads(params, rand_grads(params))
        ours.step()
    sd = roundtrip(ours.state_dict())
    theirs = clone_params(params)
    ref = TWIN(_two_groups(theirs, False), lr=0.5, foreach=False)
    ref.load_state_dict(sd)
    assert_same_training(ours, params, ref, theirs)
    twin_run(RMSprop, TWIN, {}, params, 3, ours=ours, ref=ref, ps_ref=theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_checkpoint_roundtrip(dtype):
    params = make_params(dtype=dtype)
    ours = RMSprop(params, lr=0.01, momentum=0.9, centered=True, master_weights=True)
    for _ in range(2):
        set_grads(params, rand_grads(params))
        ours.step()
    sd = ours.state_dict()
    for i in range(len(params)):
        for key in ("master_param", "square_avg", "grad_avg", "momentum_buffer"):
            assert sd["state"][i][key].dtype == torch.float32, key
    mine = clone_params(params)
    resumed = RMSprop(mine, lr=0.3, momentum=0.9, centered=True, master_weights=True)
    resumed.load_state_dict(roundtrip(sd))
    for _ in range(2):
        grads = rand_grads(params)
        set_grads(params, grads)
        set_grads(mine, grads)
        ours.step()
        resumed.step()
    for p, q in zip(params, mine):
        assert torch.equal(p, q)
        for key in ("master_param", "square_avg", "grad_avg", "momentum_buffer", "step"):
            assert torch.equal(ours.state[p][key], resumed.state[q][key]), key


# -------------------------------------------------------- groups, late grads, odd params


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_param_groups_and_late_grads_match_torch(backend):
    params = make_params()
    groups = [{"params": params[:2]},
              {"params": params[2:4], "lr": 0.03, "momentum": 0.9, "centered": True},
              {"params": params[4:], "weight_decay": 0.2, "maximize": True, "alpha": 0.9}]
    ours = RMSprop(groups, lr=0.01, backend=backend)
    ref = TWIN([dict(g, params=clone_params(g["params"])) for g in groups], lr=0.01,
               foreach=False)
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
    assert params[1] not in ours.state and float(ours.state[params[3]]["step"]) == 2


def test_add_param_group_and_closure_match_torch():
    model = mlp()
    twin = copy.deepcopy(model)
    ours = RMSprop(model[0].parameters(), lr=0.01, momentum=0.9)
    ref = TWIN(twin[0].parameters(), lr=0.01, momentum=0.9, foreach=False)
    for k in range(4):
        if k == 2:
            ours.add_param_group({"params": model[2].parameters(), "centered": True})
            ref.add_param_group({"params": twin[2].parameters(), "centered": True})
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
    kw = dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1)
    ours = RMSprop(params, **kw, backend=backend)
    ref = TWIN(ps_ref, **kw, foreach=False)
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
    """Ours takes grad_scale / found_inf; torch's RMSprop gets grads unscaled by the
    scaler and its step skipped on overflow: the same training, and an overflow step
    changes nothing here (step included)."""
    model = mlp()
    twin = copy.deepcopy(model)
    kw = dict(lr=0.01, momentum=0.9, centered=True)
    ours = RMSprop(model.parameters(), **kw, backend=backend)
    ref = TWIN(twin.parameters(), **kw, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=2)
               for _ in range(2)]
    for it in range(5):
        x = torch.randn(5, 8)
        for m, o, sc in ((model, ours, scalers[0]), (twin, ref, scalers[1])):
            o.zero_grad()
            sc.scale(m(x).square().mean()).backward()
            if it == 2:
                next(m.parameters()).grad[0, 0] = float("inf")
            before = snapshot(list(m.parameters()), o) if (o is ours and it == 2) else None
            sc.step(o)
            sc.update()
            if before is not None:
                assert_unchanged({k: before[k] for k in ("params", "state")},
                                 list(m.parameters()), o)
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_same_training(ours, list(model.parameters()), ref, list(twin.parameters()))


# --------------------------------------------------- master weights, stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_master_weights(backend, dtype):
    params = make_params(dtype=dtype) + [nn.Parameter(torch.randn(9))]
    ref_ps = [nn.Parameter(p.detach().float().clone()) for p in params]
    kw = dict(lr=0.01, momentum=0.9, weight_decay=0.1)
    ours = RMSprop(params, **kw, master_weights=True, backend=backend)
    ref = TWIN(ref_ps, **kw, foreach=False)
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
            torch.testing.assert_close(st["square_avg"], ref.state[q]["square_avg"], **FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_first_step_within_one_ulp(backend):
    params = make_params([(4097,), (5, 9), ()], dtype=torch.bfloat16)
    ref_ps = [nn.Parameter(p.detach().float().clone()) for p in params]
    ours = RMSprop(params, lr=1e-4, stochastic_rounding=True, backend=backend)
    ref = TWIN(ref_ps, lr=1e-4, foreach=False)
    grads = rand_grads(params)
    set_grads(params, grads)
    set_grads(ref_ps, [g.float() for g in grads])
    ours.step()
    ref.step()
    rtol, atol = FP32["rtol"], FP32["atol"]
    for p, q in zip(params, ref_ps):
        st = ours.state[p]
        assert "master_param" not in st and st["square_avg"].dtype == torch.float32
        want = q.detach().double()
        bound = SR_MAX_ULPS * spacing(torch.bfloat16, want) + atol + rtol * want.abs()
        assert ((p.detach().double() - want).abs() <= bound).all()


# ------------------------------------------------------------------------- bad input

CONSTRUCTION = {
    "lr_negative": (dict(lr=-1e-3), ValueError, "lr"),
    "lr_tensor_two_elements": (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "lr"),
    "lr_string": (dict(lr="0.01"), TypeError, "lr"),
    "alpha_negative": (dict(alpha=-0.1), ValueError, "alpha"),
    "alpha_nan": (dict(alpha=float("nan")), ValueError, "alpha"),
    "eps_negative": (dict(eps=-1e-8), ValueError, "eps"),
    "weight_decay_negative": (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    "momentum_negative": (dict(momentum=-0.5), ValueError, "momentum"),
    "momentum_string": (dict(momentum="0.5"), TypeError, "momentum"),
    "centered_not_bool": (dict(centered=1), TypeError, "centered"),
    "capturable_not_bool": (dict(capturable="yes"), TypeError, "capturable"),
    "maximize_not_bool": (dict(maximize=None), TypeError, "maximize"),
    "differentiable": (dict(differentiable=True), ValueError, "differentiable"),
    "foreach_not_bool": (dict(foreach="yes"), TypeError, "foreach"),
    "master_and_sr": (dict(master_weights=True, stochastic_rounding=True), ValueError,
                      "stochastic_rounding"),
    "unknown_backend": (dict(backend="bogus"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", list(CONSTRUCTION))
def test_construction_refused(case):
    kwargs, exc, name = CONSTRUCTION[case]
    params = make_params()
    set_grads(params, rand_grads(params))
    assert_construction_refused(RMSprop, params, kwargs, exc, name)


def test_refused_step_and_group_change_nothing():
    params = make_params()
    opt = RMSprop(params[:3], lr=0.01, momentum=0.9)
    for _ in range(2):
        set_grads(params, rand_grads(params))
        opt.step()
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match="alpha"):
        opt.add_param_group({"params": params[3:], "alpha": -1.0})
    assert_unchanged(before, params, opt)
    params[1].grad = params[1].grad.to_sparse()
    before = snapshot(params, opt)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert_unchanged(before, params, opt)


# --------------------------------------------------- PyTorch's optimizer test database

REFUSED = {"differentiable": "a fused in-place step has no autograd graph; use torch.optim"}


@pytest.mark.parametrize("kwargs", optim_db_configs("RMSprop"))
def test_optim_db_config(kwargs):
    run_optim_db_config(RMSprop, TWIN, kwargs, REFUSED)


def test_refusals_are_documented():
    assert_refusals_documented(REFUSED)


@pytest.mark.parametrize("error_input", optim_db_error_inputs("RMSprop"))
def test_optim_db_error_input(error_input):
    check_optim_db_error_input(RMSprop, error_input)


# ------------------------------------------------------------------- training check


@pytest.mark.parametrize("kwargs", [dict(lr=3e-3, momentum=0.5, centered=True),
                                    dict(lr=3e-3, weight_decay=1e-4)], ids=["centered", "plain"])
def test_trains_like_torch(kwargs):
    ours, scale = train_regression(lambda ps: RMSprop(ps, **kwargs))
    theirs, _ = train_regression(lambda ps: TWIN(ps, **kwargs, foreach=False))
    assert abs(ours - theirs) <= TRAIN_LOSS_RTOL * theirs
    assert ours <= TRAIN_LOSS_MAX_FRACTION * scale, (ours, scale)
