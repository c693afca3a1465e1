"""dlopt_kernels.optim.Adam / AdamW as drop-ins for torch.optim: step by step against
torch (for-loop implementation, or fused AdamW where torch's GradScaler path is
concerned), torch.compile of the step, state_dict both ways, param groups, closures,
LR schedulers, zero_grad, params without grads, GradScaler, master weights and
stochastic rounding. Tolerances come from tests/tolerances.py only.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import CPU_BACKENDS
from optim_twin_helpers import (assert_defaults_match, assert_sr_drift_unbiased,
                                check_checkpoint_resumes_exactly, check_closure_matches_torch,
                                check_compiled_step_matches_eager, check_grad_scaler_matches_torch,
                                check_master_weights_match_twin, check_ours_checkpoint_into_torch,
                                check_sr_first_step_within_one_ulp,
                                check_torch_checkpoint_into_ours, clone_params, make_params, mlp,
                                rand_grads, roundtrip, set_grads, sr_drift, twin_groups,
                                twin_run_late_grads)
from optim_twin_helpers import twin_run as _twin_run

from dlopt_kernels.optim import Adam, AdamW

TORCH_TWIN = {Adam: torch.optim.Adam, AdamW: torch.optim.AdamW}
# Adam's states (exp_avg, exp_avg_sq) do not cancel: compared element by element
ELEMENTWISE = dict(normwise=False)


def twin_run(cls, kwargs, params, n_steps, **kw):
    """optim_twin_helpers.twin_run against cls's torch twin, states elementwise."""
    return _twin_run(cls, TORCH_TWIN[cls], kwargs, params, n_steps, **kw, **ELEMENTWISE)


CONFIGS = {
    "default": dict(),
    "lr_wd": dict(lr=0.01, weight_decay=0.1),
    "amsgrad": dict(lr=0.01, weight_decay=0.1, amsgrad=True),
    "maximize": dict(lr=0.01, weight_decay=0.1, maximize=True),
    "tensor_lr_betas_eps": dict(lr=torch.tensor(0.02), betas=(0.8, 0.99), eps=1e-6,
                                amsgrad=True),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("cls", [Adam, AdamW], ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_torch(backend, cls, config):
    kwargs = dict(copy.deepcopy(CONFIGS[config]), backend=backend)
    twin_run(cls, kwargs, make_params(), 5, grad_scales=[1.0, 3.0, 0.1, 0.5, 1.0])


def test_adam_decoupled_weight_decay_is_adamw():
    params = make_params()
    other = clone_params(params)
    a = Adam(params, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
    b = AdamW(other, lr=0.01, weight_decay=0.1)
    for _ in range(3):
        grads = rand_grads(params)
        set_grads(params, grads)
        set_grads(other, grads)
        a.step()
        b.step()
    for p, q in zip(params, other):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [Adam, AdamW], ids=lambda c: c.__name__)
def test_defaults_match_torch(cls):
    assert_defaults_match(cls, TORCH_TWIN[cls])


# ----------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_step_matches_eager(backend):
    """Bit for bit with eager, with an fp32 group and a bf16 master-weights amsgrad
    group, and no recompile when the (tensor) lr changes (optim_twin_helpers)."""
    check_compiled_step_matches_eager(lambda m: AdamW(
        [{"params": m[0].parameters()},
         {"params": m[2].parameters(), "master_weights": True, "amsgrad": True}],
        lr=torch.tensor(0.01), weight_decay=0.1, backend=backend))


def test_tensor_betas_compile_around_their_host_read():
    """Tensor betas are read on the host (docs/compat.md): torch.compile without
    fullgraph steps exactly as eager, with betas changed in place between steps (as a
    scheduler would), and as the same values given as floats."""
    torch._dynamo.reset()
    params = [torch.randn(33, 7), torch.randn(4097)]
    schedule = [(0.8, 0.99), (0.7, 0.95), (0.9, 0.999)]
    runs = []
    for kind in ("compiled", "eager", "floats"):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        tb = tuple(torch.tensor(b) for b in schedule[0])
        opt = AdamW(ps, lr=torch.tensor(0.01), betas=tb)
        step = torch.compile(opt.step) if kind == "compiled" else opt.step
        for k, betas in enumerate(schedule):
            for b, v in zip(tb, betas):
                b.fill_(v)  # float32, as the floats below
            if kind == "floats":
                opt.param_groups[0]["betas"] = tuple(float(b) for b in tb)
            for p in ps:
                p.grad = torch.full_like(p, 0.1 * (k + 1)) + p.detach() * 0.01
            step()
        runs.append([p.detach() for p in ps])
    for a, b, c in zip(*runs):
        assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------------ state_dict


def _two_groups(params, amsgrad):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "amsgrad": amsgrad}]


@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("cls", [Adam, AdamW], ids=lambda c: c.__name__)
def test_torch_checkpoint_into_ours(cls, amsgrad):
    """torch trains, saves; ours loads that checkpoint into fresh params and continues
    exactly as torch continues."""
    ours, mine = check_torch_checkpoint_into_ours(
        lambda ps: TORCH_TWIN[cls](_two_groups(ps, amsgrad), lr=0.01, weight_decay=0.1),
        lambda ps: cls(_two_groups(ps, False), lr=0.5, weight_decay=0.0),  # hparams from sd
        make_params(), ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"),
        **ELEMENTWISE)
    assert all(float(ours.state[p]["step"]) == 6 for p in mine)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("cls", [Adam, AdamW], ids=lambda c: c.__name__)
def test_ours_checkpoint_into_torch(cls, amsgrad):
    check_ours_checkpoint_into_torch(
        lambda ps: cls(_two_groups(ps, amsgrad), lr=0.01, weight_decay=0.1),
        lambda ps: TORCH_TWIN[cls](_two_groups(ps, False), lr=0.5, foreach=False),
        make_params(), **ELEMENTWISE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_checkpoint_roundtrip(dtype):
    """The fp32 master copy and fp32 states are in the state_dict and come back at fp32
    (torch's loader would cast them to the param dtype): training resumes bit for bit."""
    _, _, sd = check_checkpoint_resumes_exactly(
        lambda ps: AdamW(ps, lr=0.01, master_weights=True),
        lambda ps: AdamW(ps, lr=0.3, master_weights=True), make_params(dtype=dtype))
    keys = {"step", "master_param", "exp_avg", "exp_avg_sq"}
    assert all(set(st) == keys for st in sd["state"].values())


def test_stochastic_rounding_checkpoint_keeps_fp32_states():
    params = make_params(dtype=torch.bfloat16)
    ours = AdamW(params, lr=0.01, stochastic_rounding=True)
    set_grads(params, rand_grads(params))
    ours.step()
    mine = clone_params(params)
    resumed = AdamW(mine, stochastic_rounding=True)
    resumed.load_state_dict(roundtrip(ours.state_dict()))
    for p, q in zip(params, mine):
        assert "master_param" not in resumed.state[q]
        for key in ("exp_avg", "exp_avg_sq"):
            assert resumed.state[q][key].dtype == torch.float32
            assert torch.equal(resumed.state[q][key], ours.state[p][key])


# -------------------------------------------------------- groups, closures, schedulers


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_param_groups_match_torch(backend):
    params = make_params()
    groups = [
        {"params": params[:2]},
        {"params": params[2:4], "lr": 0.03, "betas": (0.5, 0.9), "amsgrad": True},
        {"params": params[4:], "weight_decay": 0.2, "maximize": True, "eps": 1e-4},
    ]
    ours = AdamW(groups, lr=0.01, backend=backend)
    ref, ps_ref = twin_groups(torch.optim.AdamW, groups, lr=0.01)
    twin_run(AdamW, {}, params, 4, ours=ours, ref=ref, ps_ref=ps_ref)


def test_add_param_group_matches_torch():
    params = make_params()
    first, later = params[:3], params[3:]
    ref_first, ref_later = clone_params(first), clone_params(later)
    ours = Adam(first, lr=0.01, amsgrad=True)
    ref = torch.optim.Adam(ref_first, lr=0.01, amsgrad=True, foreach=False)
    twin_run(Adam, {}, first, 2, ours=ours, ref=ref, ps_ref=ref_first)
    ours.add_param_group({"params": later, "lr": 0.05, "weight_decay": 0.1})
    ref.add_param_group({"params": ref_later, "lr": 0.05, "weight_decay": 0.1})
    assert ours.param_groups[1]["amsgrad"] is True and ours.param_groups[1]["backend"] == "auto"
    twin_run(Adam, {}, first + later, 3, ours=ours, ref=ref, ps_ref=ref_first + ref_later)


def test_closure_matches_torch():
    model = mlp()
    twin = copy.deepcopy(model)
    ours = AdamW(model.parameters(), lr=0.01)
    ref = torch.optim.AdamW(twin.parameters(), lr=0.01, foreach=False)
    check_closure_matches_torch(model, twin, ours, ref, 3, no_grad=True, **ELEMENTWISE)
    assert ours.step() is None


SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k)),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=8),
}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_lr_schedulers_match_torch(sched, tensor_lr):
    """Schedulers change lr (OneCycleLR also betas) between steps; ours reads them from
    the group every step, as torch does; a tensor lr is updated in place."""
    lr = torch.tensor(0.01) if tensor_lr else 0.01
    params = make_params()
    ps_ref = clone_params(params)
    ours = AdamW(params, lr=lr.clone() if tensor_lr else lr, weight_decay=0.1)
    ref = torch.optim.AdamW(ps_ref, lr=lr, weight_decay=0.1, foreach=False)
    s_ours, s_ref = SCHEDULERS[sched](ours), SCHEDULERS[sched](ref)
    for _ in range(6):
        twin_run(AdamW, {}, params, 1, ours=ours, ref=ref, ps_ref=ps_ref)
        s_ours.step()
        s_ref.step()
        assert float(ours.param_groups[0]["lr"]) == float(ref.param_groups[0]["lr"])
        assert isinstance(ours.param_groups[0]["lr"], torch.Tensor) == isinstance(
            ref.param_groups[0]["lr"], torch.Tensor)


def test_zero_grad():
    params = make_params()
    ours = Adam(params)
    set_grads(params, rand_grads(params))
    ours.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
    ours.zero_grad()
    assert all(p.grad is None for p in params)
    before = [p.detach().clone() for p in params]
    ours.step()  # no grads: nothing moves, no state
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert len(ours.state) == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_params_without_grads_match_torch(backend):
    """A param without a grad is skipped (no state, no step count); one that gets its
    first grad later starts its own step count then, as in torch."""
    params = make_params()
    ps_ref = clone_params(params)
    ours = Adam(params, lr=0.01, weight_decay=0.1, backend=backend)
    ref = torch.optim.Adam(ps_ref, lr=0.01, weight_decay=0.1, foreach=False)
    twin_run_late_grads(ours, params, ref, ps_ref, **ELEMENTWISE)
    assert params[1] not in ours.state or len(ours.state[params[1]]) == 0
    assert float(ours.state[params[3]]["step"]) == 2
    assert float(ours.state[params[0]]["step"]) == 4


# ----------------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler_step", "unscale_clip"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_matches_torch_fused(backend, unscale_first):
    """torch.amp.GradScaler hands our step grad_scale / found_inf (or found_inf only,
    after scaler.unscale_ for clipping). A step with an inf grad is skipped entirely,
    state step included, and everything matches torch's fused AdamW with the same
    scaler settings."""
    model = mlp()
    twin = copy.deepcopy(model)
    ours = AdamW(model.parameters(), lr=0.01, weight_decay=0.1, amsgrad=True, backend=backend)
    ref = torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.1, amsgrad=True,
                            fused=True)
    check_grad_scaler_matches_torch(ours, ref, model, twin, 6, (2,), unscale_clip=unscale_first,
                                    **ELEMENTWISE)
    steps = {float(ours.state[p]["step"]) for p in model.parameters()}
    assert steps == {5.0}
    assert not hasattr(ours, "grad_scale") and not hasattr(ours, "found_inf")


# --------------------------------------------------- master weights, stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_master_weights(backend, dtype):
    """Low-precision params with an fp32 master copy in the state: param == master
    rounded after every step, and the masters follow torch's fp32 AdamW on the same
    (upcast) grads. fp32 params in the same optimizer get no master."""
    check_master_weights_match_twin(AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1),
                                    dtype, backend, ("exp_avg", "exp_avg_sq"), n_steps=4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_first_step_within_one_ulp(backend):
    check_sr_first_step_within_one_ulp(AdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1),
                                       backend, "exp_avg", fp32_param=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_keeps_tiny_updates(backend):
    """Updates far below half a bf16 ulp: round-to-nearest never moves the params (all
    stay 1.0), stochastic rounding moves them by the right amount on average (every Adam
    step on unit grads moves by exactly -lr)."""
    n, n_steps, lr = 4096, 40, 1e-4
    drift = sr_drift(lambda ps, sr: Adam(ps, lr=lr, stochastic_rounding=sr, backend=backend),
                     1.0, n=n, n_steps=n_steps)
    assert_sr_drift_unbiased(drift, n, n_steps, lr)
