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

from conftest import CPU_BACKENDS, GPU
from optim_twin_helpers import (FP32, assert_construction_refused, assert_same_training,
                                assert_unchanged, check_optim_db_error_input, clone_params,
                                make_params, mlp, optim_db_configs, optim_db_error_inputs,
                                rand_grads, roundtrip, run_optim_db_config, set_grads,
                                snapshot, train_regression, twin_run)
from tolerances import SR_MAX_ULPS, TRAIN_LOSS_MAX_FRACTION, TRAIN_LOSS_RTOL, spacing

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
    p = [nn.Parameter(torch.zeros(2))]
    ours, ref = Adafactor(p), TWIN(p)
    for key, value in ref.defaults.items():
        assert ours.defaults[key] == value, key
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
    """The step under torch.compile(fullgraph=True) gives the eager result bit for bit
    (an fp32 group and a bf16 master-weights group), without recompiling when the
    tensor lr changes."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = mlp()
    model[2].to(torch.bfloat16)
    twin = copy.deepcopy(model)

    def make(m):
        return Adafactor([{"params": m[0].parameters()},
                          {"params": m[2].parameters(), "master_weights": True}],
                         lr=torch.tensor(0.02), weight_decay=0.1, backend=backend)

    opt, opt_eager = make(model), make(twin)
    compiled_step = torch.compile(opt.step, fullgraph=True)
    graphs_before = counters["stats"]["unique_graphs"]
    for i in range(3):
        x = torch.randn(5, 8)
        for m, o, step in ((model, opt, compiled_step), (twin, opt_eager, opt_eager.step)):
            o.zero_grad()
            m[2](m[1](m[0](x)).bfloat16()).float().square().mean().backward()
            step()
            o.defaults["lr"].mul_(0.7)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q), f"step {i}"
    assert counters["stats"]["unique_graphs"] - graphs_before <= 2


# ------------------------------------------------------------------------ state_dict


def _two_groups(params):
    return [{"params": params[:3]}, {"params": params[3:], "lr": 0.02, "d": 1.5}]


def test_torch_checkpoint_into_ours():
    params = make_params(SHAPES)
    ref = TWIN(_two_groups(params), lr=0.01, weight_decay=0.1)
    for _ in range(3):
        set_grads(params, rand_grads(params))
        ref.step()
    sd = roundtrip(ref.state_dict())
    mine = clone_params(params)
    ours = Adafactor(_two_groups(mine), lr=0.5)  # hparams come from sd
    ours.load_state_dict(sd)
    for g_ours, g_ref in zip(ours.param_groups, ref.param_groups):
        for key in ("lr", "beta2_decay", "eps", "d", "weight_decay", "maximize"):
            assert g_ours[key] == g_ref[key], key
    assert_same_training(ours, mine, ref, params)
    twin_run(Adafactor, TWIN, {}, mine, 3, ours=ours, ref=ref, ps_ref=params)
    assert all(float(ours.state[p]["step"]) == 6 for p in mine)


def test_ours_checkpoint_into_torch():
    params = make_params(SHAPES)
    ours = Adafactor(_two_groups(params), lr=0.01, weight_decay=0.1)
    for _ in range(3):
        set_grads(params, rand_grads(params))
        ours.step()
    sd = roundtrip(ours.state_dict())
    theirs = clone_params(params)
    ref = TWIN(_two_groups(theirs), lr=0.5, foreach=False)
    ref.load_state_dict(sd)
    assert_same_training(ours, params, ref, theirs)
    twin_run(Adafactor, TWIN, {}, params, 3, ours=ours, ref=ref, ps_ref=theirs)


@pytest.mark.parametrize("mode", ["master_weights", "stochastic_rounding"])
def test_low_precision_checkpoint_roundtrip(mode):
    """fp32 factors (and the fp32 master copy) survive state_dict -> load at fp32, with
    their factored shapes; training resumes bit for bit."""
    params = make_params(SHAPES, dtype=torch.bfloat16)
    ours = Adafactor(params, lr=0.02, **{mode: True})
    for _ in range(2):
        set_grads(params, rand_grads(params))
        ours.step()
    sd = ours.state_dict()
    for i, p in enumerate(params):
        for key, value in sd["state"][i].items():
            if key != "step":
                assert value.dtype == torch.float32, key
    mine = clone_params(params)
    resumed = Adafactor(mine, lr=0.3, **{mode: True})
    resumed.load_state_dict(roundtrip(sd))
    for k in range(2):
        grads = rand_grads(params)
        set_grads(params, grads)
        set_grads(mine, grads)
        torch.manual_seed(k)  # the same stochastic-rounding seed for both
        ours.step()
        torch.manual_seed(k)
        resumed.step()
    for p, q in zip(params, mine):
        assert torch.equal(p, q)
        for key, value in ours.state[p].items():
            assert torch.equal(resumed.state[q][key], value), key
            assert resumed.state[q][key].shape == value.shape


# -------------------------------------------------------- groups, odd params, closures


@pytest.mark.parametrize("backend", NOT_INTERPRETED)
def test_param_groups_and_late_grads_match_torch(backend):
    params = make_params(SHAPES)
    groups = [{"params": params[:2]},
              {"params": params[2:4], "lr": 0.03, "beta2_decay": -0.6, "maximize": True},
              {"params": params[4:], "weight_decay": 0.2, "eps": (1e-4, 1e-2)}]
    ours = Adafactor(groups, lr=0.01, backend=backend)
    ref = TWIN([dict(g, params=clone_params(g["params"])) for g in groups], lr=0.01,
               foreach=False)
    ps_ref = [p for g in ref.param_groups for p in g["params"]]
    for k in range(4):
        grads = rand_grads(params)
        grads[1] = None  # never a grad
        if k < 2:
            grads[3] = None  # a grad from step 3 on
        set_grads(params, grads)
        set_grads(ps_ref, grads)
        ours.step()
        ref.step()
        assert_same_training(ours, params, ref, ps_ref)
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
    for _ in range(2):
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

        with torch.no_grad():
            torch.testing.assert_close(ours.step(closure), ref.step(closure_ref), **FP32)
        assert_same_training(ours, list(model.parameters()), ref, list(twin.parameters()))


# ----------------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("backend", NOT_INTERPRETED)
def test_grad_scaler_matches_torch(backend):
    """GradScaler hands ours grad_scale / found_inf (torch's Adafactor gets its grads
    unscaled by the scaler instead); an overflow step changes nothing, steps included."""
    model = mlp()
    twin = copy.deepcopy(model)
    ours = Adafactor(model.parameters(), lr=0.02, weight_decay=0.1, backend=backend)
    ref = TWIN(twin.parameters(), lr=0.02, weight_decay=0.1, foreach=False)
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
@pytest.mark.parametrize("backend", NOT_INTERPRETED)
def test_master_weights(backend, dtype):
    """bf16/fp16 params with fp32 masters follow torch's fp32 Adafactor on the same
    (upcast) grads, with eps1 given (eps1=None would take the param dtype's epsilon)."""
    params = make_params(SHAPES, dtype=dtype) + [nn.Parameter(torch.randn(9))]
    ref_ps = [nn.Parameter(p.detach().float().clone()) for p in params]
    eps = (1e-6, 1e-3)
    ours = Adafactor(params, lr=0.02, eps=eps, weight_decay=0.1, master_weights=True,
                     backend=backend)
    ref = TWIN(ref_ps, lr=0.02, eps=eps, weight_decay=0.1, foreach=False)
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
            for key in ("row_var", "col_var", "variance"):
                if key in ref.state[q]:
                    torch.testing.assert_close(st[key], ref.state[q][key], **FP32)


@pytest.mark.parametrize("backend", NOT_INTERPRETED)
def test_stochastic_rounding_first_step_within_one_ulp(backend):
    params = make_params([(41, 9), (4097,), ()], dtype=torch.bfloat16)
    ref_ps = [nn.Parameter(p.detach().float().clone()) for p in params]
    eps = (1e-6, 1e-3)
    ours = Adafactor(params, lr=1e-2, eps=eps, weight_decay=0.1, stochastic_rounding=True,
                     backend=backend)
    ref = TWIN(ref_ps, lr=1e-2, eps=eps, weight_decay=0.1, foreach=False)
    grads = rand_grads(params)
    set_grads(params, grads)
    set_grads(ref_ps, [g.float() for g in grads])
    ours.step()
    ref.step()
    for p, q in zip(params, ref_ps):
        want = q.detach().double()
        bound = (SR_MAX_ULPS * spacing(torch.bfloat16, want) + FP32["atol"]
                 + FP32["rtol"] * want.abs())
        assert ((p.detach().double() - want).abs() <= bound).all()
        assert "master_param" not in ours.state[p]


# ------------------------------------------------------------------------- bad input

CONSTRUCTION = {
    "lr_negative": (dict(lr=-1e-3), ValueError, "lr"),
    "lr_nan": (dict(lr=float("nan")), ValueError, "lr"),
    "lr_tensor_two_elements": (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "lr"),
    "lr_string": (dict(lr="0.01"), TypeError, "lr"),
    "beta2_decay_positive": (dict(beta2_decay=0.8), ValueError, "beta2_decay"),
    "beta2_decay_nan": (dict(beta2_decay=float("nan")), ValueError, "beta2_decay"),
    "beta2_decay_string": (dict(beta2_decay="-0.8"), TypeError, "beta2_decay"),
    "eps1_negative": (dict(eps=(-1e-30, 1e-3)), ValueError, "eps"),
    "eps2_negative": (dict(eps=(None, -1e-3)), ValueError, "eps"),
    "eps2_none": (dict(eps=(None, None)), TypeError, "eps"),
    "eps_scalar": (dict(eps=1e-3), TypeError, "eps"),
    "d_below_one": (dict(d=0.5), ValueError, "d"),
    "d_nan": (dict(d=float("nan")), ValueError, "d"),
    "weight_decay_negative": (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    "maximize_not_bool": (dict(maximize="no"), TypeError, "maximize"),
    "foreach_not_bool": (dict(foreach="yes"), TypeError, "foreach"),
    "master_and_sr": (dict(master_weights=True, stochastic_rounding=True), ValueError,
                      "stochastic_rounding"),
    "unknown_backend": (dict(backend="bogus"), ValueError, "backend"),
}
if not GPU:
    CONSTRUCTION["unavailable_backend_cuda"] = (dict(backend="cuda"), ValueError, "backend")


@pytest.mark.parametrize("case", list(CONSTRUCTION))
def test_construction_refused(case):
    kwargs, exc, name = CONSTRUCTION[case]
    params = make_params(SHAPES)
    set_grads(params, rand_grads(params))
    assert_construction_refused(Adafactor, params, kwargs, exc, name)


@pytest.mark.parametrize("params,name", [
    (lambda: [torch.zeros(3, dtype=torch.int64)], "params"),
    (lambda: [nn.Parameter(torch.randn(3, dtype=torch.float64))], "params"),
    (lambda: [nn.Parameter(torch.randn(3, dtype=torch.complex64))], "params"),
    (lambda: make_params(dtype=torch.float16), "stochastic_rounding")],
    ids=["int", "float64", "complex", "sr_fp16"])
def test_bad_params_refused(params, name):
    kwargs = dict(stochastic_rounding=True) if name == "stochastic_rounding" else {}
    exc = ValueError if name == "stochastic_rounding" else TypeError
    assert_construction_refused(Adafactor, params(), kwargs, exc, name)


def test_refused_step_and_group_change_nothing():
    params = make_params(SHAPES)
    opt = Adafactor(params[:3], lr=0.01)
    for _ in range(2):
        set_grads(params, rand_grads(params))
        opt.step()
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match="d"):
        opt.add_param_group({"params": params[3:], "d": 0.0})
    with pytest.raises(ValueError, match="beta2_decay"):
        opt.add_param_group({"params": params[3:], "beta2_decay": 1.0})
    assert_unchanged(before, params, opt)
    params[1].grad = params[1].grad.to_sparse()
    before = snapshot(params, opt)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert_unchanged(before, params, opt)


# --------------------------------------------------- PyTorch's optimizer test database

REFUSED: dict[str, str] = {}  # every Adafactor input torch's tests try runs here


@pytest.mark.parametrize("kwargs", optim_db_configs("Adafactor"))
def test_optim_db_config(kwargs):
    run_optim_db_config(Adafactor, TWIN, kwargs, REFUSED)


@pytest.mark.parametrize("error_input", optim_db_error_inputs("Adafactor"))
def test_optim_db_error_input(error_input):
    check_optim_db_error_input(Adafactor, error_input)


# ------------------------------------------------------------------- training check


@pytest.mark.parametrize("backend", NOT_INTERPRETED)
def test_trains_like_torch(backend):
    kwargs = dict(lr=0.05, weight_decay=1e-3)
    ours, scale = train_regression(lambda ps: Adafactor(ps, **kwargs, backend=backend))
    theirs, _ = train_regression(lambda ps: TWIN(ps, **kwargs, foreach=False))
    assert abs(ours - theirs) <= TRAIN_LOSS_RTOL * theirs, (ours, theirs)
    assert ours <= TRAIN_LOSS_MAX_FRACTION * scale, (ours, scale)
