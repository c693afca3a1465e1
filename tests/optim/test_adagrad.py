"""dlopt_kernels.optim.Adagrad as a drop-in for torch.optim.Adagrad: step by step against
torch's for-loop implementation (every constructor argument), the state layout ('step'
and 'sum' for every param from construction on), state_dict both ways, param groups
(including torch's rule that a later group's sum starts at the constructor's
initial_accumulator_value), torch.compile of the step, GradScaler against torch's fused
Adagrad, master weights, stochastic rounding, bad input per argument, PyTorch's own
optimizer test database and a small training task. Tolerances: tests/tolerances.py.
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

from dlopt_kernels.optim import Adagrad

TWIN = torch.optim.Adagrad

CONFIGS = {
    "default": dict(),
    "lr_decay_wd": dict(lr=0.1, lr_decay=0.5, weight_decay=0.1),
    "init_acc_eps_maximize": dict(lr=0.05, initial_accumulator_value=0.1, eps=1e-6,
                                  maximize=True),
    "tensor_lr": dict(lr=torch.tensor(0.02), lr_decay=0.1),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_torch(backend, config):
    kwargs = dict(copy.deepcopy(CONFIGS[config]), backend=backend)
    twin_run(Adagrad, TWIN, kwargs, make_params(), 4, grad_scales=[1.0, 3.0, 0.1, 0.5])


def test_defaults_and_state_layout_match_torch():
    params = make_params()
    ours, ref = Adagrad(params, initial_accumulator_value=0.3), TWIN(params,
                                                                     initial_accumulator_value=0.3)
    for key, value in ref.defaults.items():
        assert ours.defaults[key] == value, key
    # state exists from construction on, for every param, with or without grads
    sd_ours, sd_ref = ours.state_dict()["state"], ref.state_dict()["state"]
    assert sd_ours.keys() == sd_ref.keys() == set(range(len(params)))
    for i in sd_ref:
        assert sd_ours[i].keys() == sd_ref[i].keys() == {"step", "sum"}
        assert torch.equal(sd_ours[i]["sum"], sd_ref[i]["sum"])
        assert float(sd_ours[i]["step"]) == 0.0


def test_later_group_sum_starts_at_constructor_value():
    """torch fills a later param group's sums with the constructor's
    initial_accumulator_value, whatever the group says: ours too."""
    params = make_params()
    ps_ref = clone_params(params)
    ours = Adagrad(params[:2], lr=0.1, initial_accumulator_value=0.5)
    ref = TWIN(ps_ref[:2], lr=0.1, initial_accumulator_value=0.5, foreach=False)
    ours.add_param_group({"params": params[2:], "initial_accumulator_value": 2.0})
    ref.add_param_group({"params": ps_ref[2:], "initial_accumulator_value": 2.0})
    twin_run(Adagrad, TWIN, {}, params, 2, ours=ours, ref=ref, ps_ref=ps_ref)
    assert float(ours.state[params[3]]["step"]) == 2.0


# ----------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_step_matches_eager(backend):
    """The optimizer step under torch.compile(fullgraph=True) gives the eager result bit
    for bit (fp32 group, bf16 master-weights group) and does not recompile when the
    tensor lr changes."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = mlp()
    model[2].to(torch.bfloat16)
    twin = copy.deepcopy(model)

    def make(m):
        return Adagrad([{"params": m[0].parameters()},
                        {"params": m[2].parameters(), "master_weights": True}],
                       lr=torch.tensor(0.05), lr_decay=0.1, weight_decay=0.01, backend=backend)

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


def _two_groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "lr_decay": 0.3}]


def test_torch_checkpoint_into_ours():
    params = make_params()
    ref = TWIN(_two_groups(params), lr=0.05, weight_decay=0.1, initial_accumulator_value=0.1)
    for _ in range(3):
        set_grads(params, rand_grads(params))
        ref.step()
    sd = roundtrip(ref.state_dict())
    mine = clone_params(params)
    ours = Adagrad(_two_groups(mine), lr=0.5)  # hparams and state come from sd
    ours.load_state_dict(sd)
    for g_ours, g_ref in zip(ours.param_groups, ref.param_groups):
        for key in ("lr", "lr_decay", "weight_decay", "eps", "initial_accumulator_value",
                    "maximize"):
            assert g_ours[key] == g_ref[key], key
    assert_same_training(ours, mine, ref, params)
    twin_run(Adagrad, TWIN, {}, mine, 3, ours=ours, ref=ref, ps_ref=params)
    assert all(float(ours.state[p]["step"]) == 6 for p in mine)


def test_ours_checkpoint_into_torch():
    params = make_params()
    ours = Adagrad(_two_groups(params), lr=0.05, eps=1e-6, maximize=True)
    for _ in range(3):
        set_grads(params, rand_grads(params))
        ours.step()
    sd = roundtrip(ours.state_dict())
    theirs = clone_params(params)
    ref = TWIN(_two_groups(theirs), lr=0.5, foreach=False)
    ref.load_state_dict(sd)
    assert_same_training(ours, params, ref, theirs)
    twin_run(Adagrad, TWIN, {}, params, 3, ours=ours, ref=ref, ps_ref=theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_checkpoint_roundtrip(dtype):
    params = make_params(dtype=dtype)
    ours = Adagrad(params, lr=0.01, master_weights=True)
    for _ in range(2):
        set_grads(params, rand_grads(params))
        ours.step()
    sd = ours.state_dict()
    for i in range(len(params)):
        assert sd["state"][i]["master_param"].dtype == torch.float32
        assert sd["state"][i]["sum"].dtype == torch.float32
    mine = clone_params(params)
    resumed = Adagrad(mine, lr=0.3, master_weights=True)
    resumed.load_state_dict(roundtrip(sd))
    for _ in range(2):
        grads = rand_grads(params)
        set_grads(params, grads)
        set_grads(mine, grads)
        ours.step()
        resumed.step()
    for p, q in zip(params, mine):
        assert torch.equal(p, q)
        for key in ("master_param", "sum", "step"):
            assert torch.equal(ours.state[p][key], resumed.state[q][key]), key


def test_master_copy_taken_at_first_step():
    """Master copies are made on the first step, so weights loaded into the model after
    the optimizer was built are the ones trained."""
    params = make_params(dtype=torch.bfloat16)
    ours = Adagrad(params, lr=0.01, master_weights=True)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    set_grads(params, [torch.zeros_like(p) for p in params])
    before = [p.detach().clone() for p in params]
    ours.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)


# -------------------------------------------------------- groups, late grads, odd params


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_param_groups_and_late_grads_match_torch(backend):
    params = make_params()
    groups = [{"params": params[:2]},
              {"params": params[2:4], "lr": 0.03, "lr_decay": 0.2, "eps": 1e-4},
              {"params": params[4:], "weight_decay": 0.2, "maximize": True}]
    ours = Adagrad(groups, lr=0.01, backend=backend)
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
    assert float(ours.state[params[1]]["step"]) == 0 and float(ours.state[params[3]]["step"]) == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_params_like_torch(backend):
    """Zero-size and 0-dim params, a transposed param and a transposed grad."""
    params = [nn.Parameter(torch.randn(s)) for s in [(0,), (), (3, 0), (5,)]]
    params.append(nn.Parameter(torch.randn(7, 5).t()))
    params.append(nn.Parameter(torch.randn(5, 7)))
    ps_ref = clone_params(params)
    ours = Adagrad(params, lr=0.1, weight_decay=0.1, backend=backend)
    ref = TWIN(ps_ref, lr=0.1, weight_decay=0.1, foreach=False)
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
def test_grad_scaler_matches_torch_fused(backend):
    """GradScaler hands ours and torch's fused Adagrad grad_scale / found_inf; an
    overflow step changes nothing at all (steps included)."""
    model = mlp()
    twin = copy.deepcopy(model)
    ours = Adagrad(model.parameters(), lr=0.05, lr_decay=0.1, weight_decay=0.1, backend=backend)
    ref = TWIN(twin.parameters(), lr=0.05, lr_decay=0.1, weight_decay=0.1, fused=True)
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
    assert {float(ours.state[p]["step"]) for p in model.parameters()} == {4.0}


# --------------------------------------------------- master weights, stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_master_weights(backend, dtype):
    params = make_params(dtype=dtype) + [nn.Parameter(torch.randn(9))]
    ref_ps = [nn.Parameter(p.detach().float().clone()) for p in params]
    ours = Adagrad(params, lr=0.01, weight_decay=0.1, master_weights=True, backend=backend)
    ref = TWIN(ref_ps, lr=0.01, weight_decay=0.1, foreach=False)
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
            torch.testing.assert_close(st["sum"], ref.state[q]["sum"], **FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_first_step_within_one_ulp(backend):
    params = make_params([(4097,), (5, 9), ()], dtype=torch.bfloat16)
    ref_ps = [nn.Parameter(p.detach().float().clone()) for p in params]
    ours = Adagrad(params, lr=1e-3, initial_accumulator_value=1.0, stochastic_rounding=True,
                   backend=backend)
    ref = TWIN(ref_ps, lr=1e-3, initial_accumulator_value=1.0, foreach=False)
    grads = rand_grads(params)
    set_grads(params, grads)
    set_grads(ref_ps, [g.float() for g in grads])
    ours.step()
    ref.step()
    rtol, atol = FP32["rtol"], FP32["atol"]
    for p, q in zip(params, ref_ps):
        st = ours.state[p]
        assert "master_param" not in st and st["sum"].dtype == torch.float32
        want = q.detach().double()
        bound = SR_MAX_ULPS * spacing(torch.bfloat16, want) + atol + rtol * want.abs()
        assert ((p.detach().double() - want).abs() <= bound).all()


# ------------------------------------------------------------------------- bad input

CONSTRUCTION = {
    "lr_negative": (dict(lr=-1e-3), ValueError, "lr"),
    "lr_tensor_two_elements": (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "lr"),
    "lr_string": (dict(lr="0.01"), TypeError, "lr"),
    "lr_decay_negative": (dict(lr_decay=-0.5), ValueError, "lr_decay"),
    "lr_decay_nan": (dict(lr_decay=float("nan")), ValueError, "lr_decay"),
    "weight_decay_negative": (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    "initial_accumulator_value_negative": (dict(initial_accumulator_value=-1.0), ValueError,
                                           "initial_accumulator_value"),
    "initial_accumulator_value_string": (dict(initial_accumulator_value="0"), TypeError,
                                         "initial_accumulator_value"),
    "eps_negative": (dict(eps=-1e-10), ValueError, "eps"),
    "eps_nan": (dict(eps=float("nan")), ValueError, "eps"),
    "maximize_not_bool": (dict(maximize=1), TypeError, "maximize"),
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
    assert_construction_refused(Adagrad, params, kwargs, exc, name)


def test_refused_step_and_group_change_nothing():
    params = make_params()
    opt = Adagrad(params[:3], lr=0.01)
    for _ in range(2):
        set_grads(params, rand_grads(params))
        opt.step()
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match="lr_decay"):
        opt.add_param_group({"params": params[3:], "lr_decay": -1.0})
    assert_unchanged(before, params, opt)
    params[1].grad = params[1].grad.to_sparse()
    before = snapshot(params, opt)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert_unchanged(before, params, opt)


# --------------------------------------------------- PyTorch's optimizer test database

REFUSED = {"differentiable": "a fused in-place step has no autograd graph; use torch.optim"}


@pytest.mark.parametrize("kwargs", optim_db_configs("Adagrad"))
def test_optim_db_config(kwargs):
    run_optim_db_config(Adagrad, TWIN, kwargs, REFUSED)


def test_refusals_are_documented():
    assert_refusals_documented(REFUSED)


@pytest.mark.parametrize("error_input", optim_db_error_inputs("Adagrad"))
def test_optim_db_error_input(error_input):
    check_optim_db_error_input(Adagrad, error_input)


# ------------------------------------------------------------------- training check


def test_trains_like_torch():
    kwargs = dict(lr=0.05, lr_decay=1e-3, weight_decay=1e-4, initial_accumulator_value=0.1)
    ours, scale = train_regression(lambda ps: Adagrad(ps, **kwargs))
    theirs, _ = train_regression(lambda ps: TWIN(ps, **kwargs, foreach=False))
    assert abs(ours - theirs) <= TRAIN_LOSS_RTOL * theirs
    assert ours <= TRAIN_LOSS_MAX_FRACTION * scale, (ours, scale)
