"""dlopt_kernels.optim.Adafactor as a drop-in for torch.optim.Adafactor: step by step
against torch (for-loop and foreach implementations), its constructor arguments and
defaults, state_dict both ways (row_var / col_var / variance, step), torch.compile of
the step, param groups, eps1=None resolution, zero-size params (torch divides by zero),
GradScaler, master weights, stochastic rounding, torch's optimizer test database, bad
input, and a training check. Tolerances come from tests/tolerances.py only.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import CPU_BACKENDS
from optim_twin_helpers import (FP32, assert_construction_refused, assert_defaults_match,
                                check_checkpoint_resumes_exactly, check_closure_matches_torch,
                                check_compiled_step_matches_eager, check_construction_case,
                                check_grad_scaler_matches_torch, check_master_weights_match_twin,
                                check_ours_checkpoint_into_torch,
                                check_refused_group_and_sparse_step,
                                check_sr_first_step_within_one_ulp,
                                check_torch_checkpoint_into_ours, check_trains_like, clone_params,
                                construction_cases, make_params, mlp, optim_db_tests, rand_grads,
                                set_grads, twin_groups, twin_run, twin_run_late_grads)

from dlopt_kernels.optim import Adafactor

TWIN = torch.optim.Adafactor
SHAPES = [(7, 13), (13,), (3, 7), (3,), (), (2, 4, 5)]
# many-step tests skip the Triton interpreter (several launches per tensor per step);
# tests/ops/test_optim_adafactor.py covers that backend's maths
NOT_INTERPRETED = [b for b in CPU_BACKENDS if b != "triton"]

CONFIGS = {
    "default": dict(),
    "lr_wd": dict(lr=0.05, weight_decay=0.1),
    "maximize_beta2_decay": dict(maximize=True, beta2_decay=-0.5, weight_decay=0.1),
    "eps_d": dict(eps=(1e-3, 1e-2), d=1.5),
    "tensor_lr": dict(lr=torch.tensor(0.02), weight_decay=0.05),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_torch(backend, config):
    kwargs = dict(copy.deepcopy(CONFIGS[config]), backend=backend)
    twin_run(Adafactor, TWIN, kwargs, make_params(SHAPES), 3, grad_scales=[1.0, 3.0, 0.1])


def test_matches_torch_foreach():
    params = make_params(SHAPES)
    ps_ref = clone_params(params)
    ref = TWIN(ps_ref, lr=0.02, weight_decay=0.1, foreach=True)
    ours = Adafactor(params, lr=0.02, weight_decay=0.1, foreach=True)
    twin_run(Adafactor, TWIN, {}, params, 3, ours=ours, ref=ref, ps_ref=ps_ref)


def test_defaults_and_state_layout_match_torch():
    assert_defaults_match(Adafactor, TWIN)
    ours, ref, ps_ref = twin_run(Adafactor, TWIN, {}, make_params(SHAPES), 1)
    for i, st in ours.state_dict()["state"].items():
        want = ref.state_dict()["state"][i]
        assert set(st) == set(want)
        for key, value in want.items():
            assert st[key].shape == value.shape and st[key].dtype == value.dtype, key


def test_eps1_none_takes_the_first_params_dtype():
    """torch resolves eps1=None once per group, from its first param with a grad: a bf16
    group runs with bf16's epsilon (bit for bit as eps=(finfo(bf16).eps, 1e-3)), which at
    this grad scale changes the result against fp32's epsilon."""
    params = make_params([(6, 5), (7,)], dtype=torch.bfloat16)
    grads = [g * 1e-3 for g in rand_grads(params)]
    runs = []
    for eps1 in (None, torch.finfo(torch.bfloat16).eps, torch.finfo(torch.float32).eps):
        ps = clone_params(params)
        set_grads(ps, grads)
        Adafactor(ps, eps=(eps1, 1e-3), master_weights=True).step()
        runs.append(ps)
    assert all(torch.equal(p, q) for p, q in zip(runs[0], runs[1]))
    assert not all(torch.equal(p, q) for p, q in zip(runs[0], runs[2]))


# ----------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_step_matches_eager(backend):
    """Bit for bit with eager (an fp32 group and a bf16 master-weights group), without
    recompiling when the tensor lr changes (optim_twin_helpers)."""
    check_compiled_step_matches_eager(lambda m: Adafactor(
        [{"params": m[0].parameters()}, {"params": m[2].parameters(), "master_weights": True}],
        lr=torch.tensor(0.02), weight_decay=0.1, backend=backend), n_steps=3)


# ------------------------------------------------------------------------ state_dict


def _two_groups(params):
    return [{"params": params[:3]}, {"params": params[3:], "lr": 0.02, "d": 1.5}]


def test_torch_checkpoint_into_ours():
    ours, mine = check_torch_checkpoint_into_ours(
        lambda ps: TWIN(_two_groups(ps), lr=0.01, weight_decay=0.1),
        lambda ps: Adafactor(_two_groups(ps), lr=0.5),  # hparams come from the checkpoint
        make_params(SHAPES), ("lr", "beta2_decay", "eps", "d", "weight_decay", "maximize"))
    assert all(float(ours.state[p]["step"]) == 6 for p in mine)


def test_ours_checkpoint_into_torch():
    check_ours_checkpoint_into_torch(
        lambda ps: Adafactor(_two_groups(ps), lr=0.01, weight_decay=0.1),
        lambda ps: TWIN(_two_groups(ps), lr=0.5, foreach=False), make_params(SHAPES))


@pytest.mark.parametrize("mode", ["master_weights", "stochastic_rounding"])
def test_low_precision_checkpoint_roundtrip(mode):
    """fp32 factors (and the fp32 master copy) survive state_dict -> load at fp32, with
    their factored shapes; training resumes bit for bit."""
    check_checkpoint_resumes_exactly(lambda ps: Adafactor(ps, lr=0.02, **{mode: True}),
                                     lambda ps: Adafactor(ps, lr=0.3, **{mode: True}),
                                     make_params(SHAPES, dtype=torch.bfloat16), reseed=True)


# -------------------------------------------------------- groups, odd params, closures


@pytest.mark.parametrize("backend", NOT_INTERPRETED)
def test_param_groups_and_late_grads_match_torch(backend):
    params = make_params(SHAPES)
    groups = [{"params": params[:2]},
              {"params": params[2:4], "lr": 0.03, "beta2_decay": -0.6, "maximize": True},
              {"params": params[4:], "weight_decay": 0.2, "eps": (1e-4, 1e-2)}]
    ours = Adafactor(groups, lr=0.01, backend=backend)
    ref, ps_ref = twin_groups(TWIN, groups, lr=0.01)
    twin_run_late_grads(ours, params, ref, ps_ref)
    assert params[1] not in ours.state
    assert float(ours.state[params[3]]["step"]) == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_params_like_torch(backend):
    """0-dim and 1-element params, a transposed param and a transposed grad, match
    torch; a zero-size param (torch divides by zero on it) only counts its steps."""
    shapes = [(), (1,), (1, 1), (5,)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    params.append(nn.Parameter(torch.randn(7, 5).t()))
    params.append(nn.Parameter(torch.randn(5, 7)))
    empty = [nn.Parameter(torch.randn(0)), nn.Parameter(torch.randn(3, 0))]
    ps_ref = clone_params(params)
    ours = Adafactor(params + empty, lr=0.02, weight_decay=0.1, backend=backend)
    ref = TWIN(ps_ref, lr=0.02, weight_decay=0.1, foreach=False)
    for _ in range(2):
        grads = rand_grads(params)
        grads[-1] = torch.randn(7, 5).t()
        set_grads(params, grads)
        set_grads(ps_ref, grads)
        set_grads(empty, rand_grads(empty))
        ours.step()
        ref.step()
        for p, q in zip(params, ps_ref):  # (assert_same_training counts states: no empties)
            torch.testing.assert_close(p.detach(), q.detach(), **FP32)
            for key, want in ref.state[q].items():
                torch.testing.assert_close(ours.state[p][key], want.to(ours.state[p][key]),
                                           **FP32)
    assert params[4].stride() == (1, 5)
    for p in empty:
        assert float(ours.state[p]["step"]) == 2
    ps = clone_params(empty)
    set_grads(ps, rand_grads(ps))
    with pytest.raises(ZeroDivisionError):  # torch's own step on the zero-size params
        TWIN(ps).step()


def test_closure_matches_torch():
    model = mlp()
    twin = copy.deepcopy(model)
    ours = Adafactor(model.parameters(), lr=0.02)
    ref = TWIN(twin.parameters(), lr=0.02, foreach=False)
    check_closure_matches_torch(model, twin, ours, ref, 2, no_grad=True)


# ----------------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("backend", NOT_INTERPRETED)
def test_grad_scaler_matches_torch(backend):
    """GradScaler hands ours grad_scale / found_inf (torch's Adafactor gets its grads
    unscaled by the scaler instead); an overflow step changes nothing, steps included."""
    model = mlp()
    twin = copy.deepcopy(model)
    ours = Adafactor(model.parameters(), lr=0.02, weight_decay=0.1, backend=backend)
    ref = TWIN(twin.parameters(), lr=0.02, weight_decay=0.1, foreach=False)
    check_grad_scaler_matches_torch(ours, ref, model, twin, 5, (2,))
    assert {float(ours.state[p]["step"]) for p in model.parameters()} == {4.0}


# --------------------------------------------------- master weights, stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", NOT_INTERPRETED)
def test_master_weights(backend, dtype):
    """bf16/fp16 params with fp32 masters follow torch's fp32 Adafactor on the same
    (upcast) grads, with eps1 given (eps1=None would take the param dtype's epsilon)."""
    check_master_weights_match_twin(Adafactor, TWIN,
                                    dict(lr=0.02, eps=(1e-6, 1e-3), weight_decay=0.1), dtype,
                                    backend, ("row_var", "col_var", "variance"), shapes=SHAPES,
                                    optional_keys=True)


@pytest.mark.parametrize("backend", NOT_INTERPRETED)
def test_stochastic_rounding_first_step_within_one_ulp(backend):
    check_sr_first_step_within_one_ulp(Adafactor, TWIN,
                                       dict(lr=1e-2, eps=(1e-6, 1e-3), weight_decay=0.1), backend,
                                       shapes=[(41, 9), (4097,), ()])


# ------------------------------------------------------------------------- bad input

CONSTRUCTION = construction_cases({
    "beta2_decay_positive": (dict(beta2_decay=0.8), ValueError, "beta2_decay"),
    "beta2_decay_nan": (dict(beta2_decay=float("nan")), ValueError, "beta2_decay"),
    "beta2_decay_string": (dict(beta2_decay="-0.8"), TypeError, "beta2_decay"),
    "eps1_negative": (dict(eps=(-1e-30, 1e-3)), ValueError, "eps"),
    "eps2_negative": (dict(eps=(None, -1e-3)), ValueError, "eps"),
    "eps2_none": (dict(eps=(None, None)), TypeError, "eps"),
    "eps_scalar": (dict(eps=1e-3), TypeError, "eps"),
    "d_below_one": (dict(d=0.5), ValueError, "d"),
    "d_nan": (dict(d=float("nan")), ValueError, "d"),
    "maximize_not_bool": (dict(maximize="no"), TypeError, "maximize"),
    "foreach_not_bool": (dict(foreach="yes"), TypeError, "foreach"),
})


@pytest.mark.parametrize("case", list(CONSTRUCTION))
def test_construction_refused(case):
    check_construction_case(Adafactor, CONSTRUCTION[case], SHAPES)


@pytest.mark.parametrize("params,name", [
    (lambda: [torch.zeros(3, dtype=torch.int64)], "params"),
    (lambda: [nn.Parameter(torch.randn(3, dtype=torch.complex64))], "params"),
    (lambda: make_params(dtype=torch.float16), "stochastic_rounding")],
    ids=["int", "complex", "sr_fp16"])
def test_bad_params_refused(params, name):
    kwargs = dict(stochastic_rounding=True) if name == "stochastic_rounding" else {}
    exc = ValueError if name == "stochastic_rounding" else TypeError
    assert_construction_refused(Adafactor, params(), kwargs, exc, name)


def test_refused_step_and_group_change_nothing():
    check_refused_group_and_sparse_step(lambda ps: Adafactor(ps, lr=0.01), make_params(SHAPES),
                                        [({"d": 0.0}, ValueError, "d"),
                                         ({"beta2_decay": 1.0}, ValueError, "beta2_decay")])


# --------------------------------------------------- PyTorch's optimizer test database

REFUSED: dict[str, str] = {}  # every Adafactor input torch's tests try runs here
test_optim_db_config, test_refusals_are_documented, test_optim_db_error_input = \
    optim_db_tests(Adafactor, TWIN, REFUSED)


# ------------------------------------------------------------------- training check


@pytest.mark.parametrize("backend", NOT_INTERPRETED)
def test_trains_like_torch(backend):
    kwargs = dict(lr=0.05, weight_decay=1e-3)
    check_trains_like(lambda ps: Adafactor(ps, **kwargs, backend=backend),
                      lambda ps: TWIN(ps, **kwargs, foreach=False))
