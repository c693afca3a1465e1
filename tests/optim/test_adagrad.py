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

from conftest import CPU_BACKENDS
from optim_twin_helpers import (check_checkpoint_resumes_exactly, check_compiled_step_matches_eager,
                                check_construction_case, check_grad_scaler_matches_torch,
                                check_master_weights_match_twin, check_odd_params_like_torch,
                                check_ours_checkpoint_into_torch,
                                check_refused_group_and_sparse_step,
                                check_sr_first_step_within_one_ulp,
                                check_torch_checkpoint_into_ours, check_trains_like, clone_params,
                                construction_cases, make_params, mlp, optim_db_tests, set_grads,
                                twin_groups, twin_run, twin_run_late_grads)

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
    """Bit for bit with eager (fp32 group, bf16 master-weights group), no recompile when
    the tensor lr changes (optim_twin_helpers)."""
    check_compiled_step_matches_eager(lambda m: Adagrad(
        [{"params": m[0].parameters()}, {"params": m[2].parameters(), "master_weights": True}],
        lr=torch.tensor(0.05), lr_decay=0.1, weight_decay=0.01, backend=backend))


# ------------------------------------------------------------------------ state_dict


def _two_groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "lr_decay": 0.3}]


def test_torch_checkpoint_into_ours():
    ours, mine = check_torch_checkpoint_into_ours(
        lambda ps: TWIN(_two_groups(ps), lr=0.05, weight_decay=0.1, initial_accumulator_value=0.1),
        lambda ps: Adagrad(_two_groups(ps), lr=0.5),  # hparams and state come from it
        make_params(), ("lr", "lr_decay", "weight_decay", "eps", "initial_accumulator_value",
                        "maximize"))
    assert all(float(ours.state[p]["step"]) == 6 for p in mine)


def test_ours_checkpoint_into_torch():
    check_ours_checkpoint_into_torch(
        lambda ps: Adagrad(_two_groups(ps), lr=0.05, eps=1e-6, maximize=True),
        lambda ps: TWIN(_two_groups(ps), lr=0.5, foreach=False), make_params())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_checkpoint_roundtrip(dtype):
    _, _, sd = check_checkpoint_resumes_exactly(
        lambda ps: Adagrad(ps, lr=0.01, master_weights=True),
        lambda ps: Adagrad(ps, lr=0.3, master_weights=True), make_params(dtype=dtype))
    assert all(set(st) == {"step", "master_param", "sum"} for st in sd["state"].values())


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
    ref, ps_ref = twin_groups(TWIN, groups, lr=0.01)
    twin_run_late_grads(ours, params, ref, ps_ref)
    assert float(ours.state[params[1]]["step"]) == 0 and float(ours.state[params[3]]["step"]) == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_params_like_torch(backend):
    """Zero-size and 0-dim params, a transposed param and a transposed grad."""
    check_odd_params_like_torch(Adagrad, TWIN, dict(lr=0.1, weight_decay=0.1), backend)


# ----------------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_matches_torch_fused(backend):
    """GradScaler hands ours and torch's fused Adagrad grad_scale / found_inf; an
    overflow step changes nothing at all (steps included)."""
    model = mlp()
    twin = copy.deepcopy(model)
    kw = dict(lr=0.05, lr_decay=0.1, weight_decay=0.1)
    ours = Adagrad(model.parameters(), **kw, backend=backend)
    ref = TWIN(twin.parameters(), **kw, fused=True)
    check_grad_scaler_matches_torch(ours, ref, model, twin, 5, (2,))
    assert {float(ours.state[p]["step"]) for p in model.parameters()} == {4.0}


# --------------------------------------------------- master weights, stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_master_weights(backend, dtype):
    check_master_weights_match_twin(Adagrad, TWIN, dict(lr=0.01, weight_decay=0.1), dtype,
                                    backend, ("sum",))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_first_step_within_one_ulp(backend):
    check_sr_first_step_within_one_ulp(Adagrad, TWIN,
                                       dict(lr=1e-3, initial_accumulator_value=1.0), backend,
                                       "sum")


# ------------------------------------------------------------------------- bad input

CONSTRUCTION = construction_cases({
    "lr_decay_negative": (dict(lr_decay=-0.5), ValueError, "lr_decay"),
    "lr_decay_nan": (dict(lr_decay=float("nan")), ValueError, "lr_decay"),
    "initial_accumulator_value_negative": (dict(initial_accumulator_value=-1.0), ValueError,
                                           "initial_accumulator_value"),
    "initial_accumulator_value_string": (dict(initial_accumulator_value="0"), TypeError,
                                         "initial_accumulator_value"),
    "eps_negative": (dict(eps=-1e-10), ValueError, "eps"),
    "eps_nan": (dict(eps=float("nan")), ValueError, "eps"),
    "maximize_not_bool": (dict(maximize=1), TypeError, "maximize"),
    "differentiable": (dict(differentiable=True), ValueError, "differentiable"),
    "foreach_and_fused": (dict(foreach=True, fused=True), ValueError, "fused"),
})


@pytest.mark.parametrize("case", list(CONSTRUCTION))
def test_construction_refused(case):
    check_construction_case(Adagrad, CONSTRUCTION[case])


def test_refused_step_and_group_change_nothing():
    check_refused_group_and_sparse_step(lambda ps: Adagrad(ps, lr=0.01), make_params(),
                                        [({"lr_decay": -1.0}, ValueError, "lr_decay")])


# --------------------------------------------------- PyTorch's optimizer test database

REFUSED = {"differentiable": "a fused in-place step has no autograd graph; use torch.optim"}
test_optim_db_config, test_refusals_are_documented, test_optim_db_error_input = \
    optim_db_tests(Adagrad, TWIN, REFUSED)


# ------------------------------------------------------------------- training check


def test_trains_like_torch():
    kwargs = dict(lr=0.05, lr_decay=1e-3, weight_decay=1e-4, initial_accumulator_value=0.1)
    check_trains_like(lambda ps: Adagrad(ps, **kwargs),
                      lambda ps: TWIN(ps, **kwargs, foreach=False))
