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

from conftest import CPU_BACKENDS
from optim_twin_helpers import (assert_defaults_match, check_checkpoint_resumes_exactly,
                                check_closure_matches_torch, check_compiled_step_matches_eager,
                                check_construction_case, check_grad_scaler_matches_torch,
                                check_master_weights_match_twin, check_odd_params_like_torch,
                                check_ours_checkpoint_into_torch,
                                check_refused_group_and_sparse_step,
                                check_sr_first_step_within_one_ulp,
                                check_torch_checkpoint_into_ours, check_trains_like,
                                construction_cases, make_params, mlp, optim_db_tests, sr_drift,
                                twin_groups, twin_run, twin_run_late_grads)

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
    assert_defaults_match(SGD, TWIN)
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
    """Bit for bit with eager, an fp32 group and a bf16 master-weights Nesterov group,
    no recompile when the tensor lr changes (optim_twin_helpers)."""
    check_compiled_step_matches_eager(lambda m: SGD(
        [{"params": m[0].parameters()},
         {"params": m[2].parameters(), "master_weights": True, "nesterov": True}],
        lr=torch.tensor(0.05), momentum=0.9, weight_decay=0.01, backend=backend))


# ------------------------------------------------------------------------ state_dict


def _two_groups(params, momentum):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "momentum": momentum}]


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["no_momentum", "momentum"])
def test_torch_checkpoint_into_ours(momentum):
    check_torch_checkpoint_into_ours(
        lambda ps: TWIN(_two_groups(ps, momentum), lr=0.01, momentum=0.5, weight_decay=0.1),
        lambda ps: SGD(_two_groups(ps, 0.3), lr=0.5),  # hparams come from the checkpoint
        make_params(), ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"))


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["no_momentum", "momentum"])
def test_ours_checkpoint_into_torch(momentum):
    sd = check_ours_checkpoint_into_torch(
        lambda ps: SGD(_two_groups(ps, momentum), lr=0.01, momentum=0.5, nesterov=True),
        lambda ps: TWIN(_two_groups(ps, 0.1), lr=0.5, foreach=False), make_params())
    assert all("step" not in st for st in sd["state"].values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_checkpoint_roundtrip(dtype):
    _, _, sd = check_checkpoint_resumes_exactly(
        lambda ps: SGD(ps, lr=0.01, momentum=0.9, master_weights=True),
        lambda ps: SGD(ps, lr=0.3, momentum=0.9, master_weights=True), make_params(dtype=dtype))
    assert all(set(st) == {"master_param", "momentum_buffer"} for st in sd["state"].values())


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
    ref, ps_ref = twin_groups(TWIN, groups, lr=0.01, momentum=0.8)
    twin_run_late_grads(ours, params, ref, ps_ref)
    assert params[1] not in ours.state and params[0] not in ours.state


def test_add_param_group_and_closure_match_torch():
    model = mlp()
    twin = copy.deepcopy(model)
    ours = SGD(model[0].parameters(), lr=0.05, momentum=0.9)
    ref = TWIN(twin[0].parameters(), lr=0.05, momentum=0.9, foreach=False)
    check_closure_matches_torch(model, twin, ours, ref, 4, add_group_at=2,
                                group={"nesterov": True})


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_params_like_torch(backend):
    """Zero-size and 0-dim params, a transposed param and a transposed grad."""
    check_odd_params_like_torch(SGD, TWIN, dict(lr=0.01, momentum=0.9, weight_decay=0.1),
                                backend)


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

    def no_buffer_after_first_overflow(it):
        if it == 0:
            assert len(ours.state) == 0

    check_grad_scaler_matches_torch(ours, ref, model, twin, 6, (0, 3),
                                    after_iter=no_buffer_after_first_overflow)


# --------------------------------------------------- master weights, stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_master_weights(backend, dtype):
    check_master_weights_match_twin(SGD, TWIN, dict(lr=0.01, momentum=0.9, weight_decay=0.1),
                                    dtype, backend, ("momentum_buffer",))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_first_step_within_one_ulp(backend):
    check_sr_first_step_within_one_ulp(SGD, TWIN, dict(lr=1e-3, momentum=0.9), backend,
                                       "momentum_buffer")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_keeps_tiny_updates(backend):
    """Plain SGD updates of 1/8 of a bf16 ulp: round-to-nearest never moves the params,
    stochastic rounding moves them by about the right amount on average."""
    n_steps, lr = 16, 2.0**-11 / 8
    drift = sr_drift(lambda ps, sr: SGD(ps, lr=lr, stochastic_rounding=sr, backend=backend),
                     1.5, n=4096, n_steps=n_steps)
    assert drift[False] == 0.0
    assert -1.5 * n_steps * lr <= drift[True] <= -0.5 * n_steps * lr, drift


# ------------------------------------------------------------------------- bad input

CONSTRUCTION = construction_cases({
    "momentum_negative": (dict(momentum=-0.5), ValueError, "momentum"),
    "momentum_nan": (dict(momentum=float("nan")), ValueError, "momentum"),
    "momentum_string": (dict(momentum="0.9"), TypeError, "momentum"),
    "dampening_nan": (dict(momentum=0.9, dampening=float("nan")), ValueError, "dampening"),
    "dampening_none": (dict(momentum=0.9, dampening=None), TypeError, "dampening"),
    "weight_decay_tensor_negative": (dict(weight_decay=torch.tensor(-0.1)), ValueError,
                                     "weight_decay"),
    "nesterov_without_momentum": (dict(nesterov=True), ValueError, "nesterov"),
    "nesterov_with_dampening": (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
                                "nesterov"),
    "nesterov_not_bool": (dict(nesterov=1, momentum=0.9), TypeError, "nesterov"),
    "maximize_not_bool": (dict(maximize="no"), TypeError, "maximize"),
    "differentiable": (dict(differentiable=True), ValueError, "differentiable"),
    "foreach_and_fused": (dict(foreach=True, fused=True), ValueError, "fused"),
})


@pytest.mark.parametrize("case", list(CONSTRUCTION))
def test_construction_refused(case):
    check_construction_case(SGD, CONSTRUCTION[case])


def test_refused_step_and_group_change_nothing():
    check_refused_group_and_sparse_step(
        lambda ps: SGD(ps, lr=0.01, momentum=0.9), make_params(),
        [({"dampening": float("nan")}, ValueError, "dampening"),
         ({"momentum": -1.0}, ValueError, "momentum")])


# --------------------------------------------------- PyTorch's optimizer test database

REFUSED = {"differentiable": "a fused in-place step has no autograd graph; use torch.optim"}
test_optim_db_config, test_refusals_are_documented, test_optim_db_error_input = \
    optim_db_tests(SGD, TWIN, REFUSED)


# ------------------------------------------------------------------- training check


@pytest.mark.parametrize("kwargs", [dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
                                    dict(lr=0.2)], ids=["nesterov", "plain"])
def test_trains_like_torch(kwargs):
    check_trains_like(lambda ps: SGD(ps, **kwargs), lambda ps: TWIN(ps, **kwargs, foreach=False))
