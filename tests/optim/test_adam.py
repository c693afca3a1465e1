"""dlopt_kernels.optim.Adam / AdamW as drop-ins for torch.optim: step by step against
torch (for-loop implementation, or fused AdamW where torch's GradScaler path is
concerned), torch.compile of the step, state_dict both ways, param groups, closures,
LR schedulers, zero_grad, params without grads, GradScaler, master weights and
stochastic rounding. Tolerances come from tests/tolerances.py only.
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from conftest import CPU_BACKENDS
from tolerances import SR_MAX_ULPS, SR_MEAN_SIGMAS, spacing, tol

from dlopt_kernels.optim import Adam, AdamW

TORCH_TWIN = {Adam: torch.optim.Adam, AdamW: torch.optim.AdamW}
FP32 = tol(torch.float32)
SHAPES = [(7, 13), (13,), (3, 7), (3,), ()]


def make_params(shapes=SHAPES, dtype=torch.float32):
    return [nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]


def clone_params(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def rand_grads(params, scale=1.0):
    return [torch.randn_like(p) * scale for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def torch_kwargs(kwargs):
    """Ours' constructor kwargs without our extras, for the torch twin."""
    return {k: v for k, v in kwargs.items()
            if k not in ("backend", "master_weights", "stochastic_rounding")}


def assert_same_training(ours, ps_ours, ref, ps_ref, tolerance=FP32):
    """Params and every state tensor torch keeps agree; same state keys and dtypes."""
    for a, b in zip(ps_ours, ps_ref):
        torch.testing.assert_close(a.detach(), b.detach(), **tolerance)
        sa, sb = ours.state.get(a, {}), ref.state.get(b, {})
        assert set(sb) <= set(sa), (set(sa), set(sb))
        for key, want in sb.items():
            got = sa[key]
            if key == "step":
                assert float(got) == float(want)
            else:
                assert got.dtype == want.dtype, key
                torch.testing.assert_close(got, want, **tolerance)


def twin_run(cls, kwargs, params, n_steps, ours=None, ref=None, ps_ref=None, grad_scales=None):
    """Build (or continue) ours and the torch twin on the same params and grads."""
    ps_ref = clone_params(params) if ps_ref is None else ps_ref
    ours = cls(params, **kwargs) if ours is None else ours
    ref = TORCH_TWIN[cls](ps_ref, **torch_kwargs(kwargs), foreach=False) if ref is None else ref
    for k in range(n_steps):
        s = 1.0 if grad_scales is None else grad_scales[k % len(grad_scales)]
        grads = rand_grads(params, s)
        set_grads(params, grads)
        set_grads(ps_ref, grads)
        ours.step()
        ref.step()
        assert_same_training(ours, params, ref, ps_ref)
    return ours, ref, ps_ref


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
    p = [nn.Parameter(torch.zeros(2))]
    ours, ref = cls(p), TORCH_TWIN[cls](p)
    for key, value in ref.defaults.items():
        assert ours.defaults[key] == value, key


# ----------------------------------------------------------------------- torch.compile


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_step_matches_eager(backend):
    """A training step whose optimizer step is torch.compile(fullgraph=True)'d (forward
    and backward stay eager, as torch's own compiled-optimizer recipe does) gives the
    eager result bit for bit, with an fp32 group and a bf16 master-weights group, and
    does not recompile when the (tensor) lr changes."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _mlp()
    model[2].to(torch.bfloat16)
    twin = copy.deepcopy(model)

    def make(m):
        return AdamW([{"params": m[0].parameters()},
                      {"params": m[2].parameters(), "master_weights": True, "amsgrad": True}],
                     lr=torch.tensor(0.01), weight_decay=0.1, backend=backend)

    opt, opt_eager = make(model), make(twin)
    compiled_step = torch.compile(opt.step, fullgraph=True)
    graphs_before = counters["stats"]["unique_graphs"]
    for i in range(4):
        x = torch.randn(5, 8)
        for m, o, step in ((model, opt, compiled_step), (twin, opt_eager, opt_eager.step)):
            o.zero_grad()
            m[2](m[1](m[0](x)).bfloat16()).float().square().mean().backward()
            step()
            o.defaults["lr"].mul_(0.7)  # both groups share it; as a scheduler would, in place
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q), f"step {i}"
        for p in model[2].parameters():
            assert torch.equal(p, opt.state[p]["master_param"].to(p.dtype))
    # one graph for the first step (state is created), one for every later step
    assert counters["stats"]["unique_graphs"] - graphs_before <= 2


# ------------------------------------------------------------------------ state_dict


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _two_groups(params, amsgrad):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "amsgrad": amsgrad}]


@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("cls", [Adam, AdamW], ids=lambda c: c.__name__)
def test_torch_checkpoint_into_ours(cls, amsgrad):
    """torch trains, saves; ours loads that checkpoint into fresh params and continues
    exactly as torch continues."""
    params = make_params()
    ref = TORCH_TWIN[cls](_two_groups(params, amsgrad), lr=0.01, weight_decay=0.1)
    for _ in range(3):
        set_grads(params, rand_grads(params))
        ref.step()
    sd = _roundtrip(ref.state_dict())
    mine = clone_params(params)
    ours = cls(_two_groups(mine, False), lr=0.5, weight_decay=0.0)  # hparams come from sd
    ours.load_state_dict(sd)
    for g_ours, g_ref in zip(ours.param_groups, ref.param_groups):
        for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
            assert g_ours[key] == g_ref[key], key
    assert_same_training(ours, mine, ref, params)
    twin_run(cls, {}, mine, 3, ours=ours, ref=ref, ps_ref=params)
    assert all(float(ours.state[p]["step"]) == 6 for p in mine)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("cls", [Adam, AdamW], ids=lambda c: c.__name__)
def test_ours_checkpoint_into_torch(cls, amsgrad):
    params = make_params()
    ours = cls(_two_groups(params, amsgrad), lr=0.01, weight_decay=0.1)
    for _ in range(3):
        set_grads(params, rand_grads(params))
        ours.step()
    sd = _roundtrip(ours.state_dict())
    theirs = clone_params(params)
    ref = TORCH_TWIN[cls](_two_groups(theirs, False), lr=0.5, foreach=False)
    ref.load_state_dict(sd)
    assert_same_training(ours, params, ref, theirs)
    twin_run(cls, {}, params, 3, ours=ours, ref=ref, ps_ref=theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_checkpoint_roundtrip(dtype):
    """The fp32 master copy and fp32 states are in the state_dict and come back at fp32
    (torch's loader would cast them to the param dtype): training resumes bit for bit."""
    params = make_params(dtype=dtype)
    ours = AdamW(params, lr=0.01, master_weights=True)
    for _ in range(2):
        set_grads(params, rand_grads(params))
        ours.step()
    sd = ours.state_dict()
    for i in range(len(params)):
        assert sd["state"][i]["master_param"].dtype == torch.float32
        assert sd["state"][i]["exp_avg"].dtype == torch.float32
    mine = clone_params(params)
    resumed = AdamW(mine, lr=0.3, master_weights=True)
    resumed.load_state_dict(_roundtrip(sd))
    for _ in range(2):
        grads = rand_grads(params)
        set_grads(params, grads)
        set_grads(mine, grads)
        ours.step()
        resumed.step()
    for p, q in zip(params, mine):
        assert torch.equal(p, q)
        for key in ("master_param", "exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours.state[p][key], resumed.state[q][key]), key


def test_stochastic_rounding_checkpoint_keeps_fp32_states():
    params = make_params(dtype=torch.bfloat16)
    ours = AdamW(params, lr=0.01, stochastic_rounding=True)
    set_grads(params, rand_grads(params))
    ours.step()
    mine = clone_params(params)
    resumed = AdamW(mine, stochastic_rounding=True)
    resumed.load_state_dict(_roundtrip(ours.state_dict()))
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
    ref = torch.optim.AdamW(
        [dict(g, params=clone_params(g["params"])) for g in groups], lr=0.01, foreach=False)
    ps_ref = [p for g in ref.param_groups for p in g["params"]]
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
    model = _mlp()
    twin = copy.deepcopy(model)
    ours = AdamW(model.parameters(), lr=0.01)
    ref = torch.optim.AdamW(twin.parameters(), lr=0.01, foreach=False)
    for _ in range(3):
        x, y = torch.randn(6, 8), torch.randn(6, 4)
        calls = []

        def closure(m=model, o=ours):
            calls.append(1)
            o.zero_grad()
            loss = (m(x) - y).square().mean()
            loss.backward()
            return loss

        def closure_ref():
            ref.zero_grad()
            loss = (twin(x) - y).square().mean()
            loss.backward()
            return loss

        with torch.no_grad():  # step enables grad for the closure, as torch does
            loss = ours.step(closure)
        assert len(calls) == 1
        torch.testing.assert_close(loss, ref.step(closure_ref), **FP32)
        assert_same_training(ours, list(model.parameters()), ref, list(twin.parameters()))
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
    model = _mlp()
    twin = copy.deepcopy(model)
    ours = AdamW(model.parameters(), lr=0.01, weight_decay=0.1, amsgrad=True, backend=backend)
    ref = torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.1, amsgrad=True,
                            fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=2)
               for _ in range(2)]
    for it in range(6):
        x = torch.randn(5, 8)
        snapshot = None
        for m, o, sc in ((model, ours, scalers[0]), (twin, ref, scalers[1])):
            o.zero_grad()
            sc.scale(m(x).square().mean()).backward()
            if it == 2:  # an overflow in one element of one grad
                next(m.parameters()).grad[0, 0] = float("inf")
                if o is ours:
                    snapshot = ([p.detach().clone() for p in m.parameters()],
                                copy.deepcopy(ours.state_dict()["state"]))
            if unscale_first:
                sc.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            sc.step(o)
            sc.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_same_training(ours, list(model.parameters()), ref, list(twin.parameters()))
        if snapshot is not None:  # the overflow step changed nothing at all
            for p, q in zip(model.parameters(), snapshot[0]):
                assert torch.equal(p, q)
            for i, st in ours.state_dict()["state"].items():
                for key, value in st.items():
                    assert torch.equal(value, snapshot[1][i][key]), key
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
    params = make_params(dtype=dtype) + [nn.Parameter(torch.randn(9))]
    ref_ps = [nn.Parameter(p.detach().float().clone()) for p in params]
    ours = AdamW(params, lr=0.01, weight_decay=0.1, master_weights=True, backend=backend)
    ref = torch.optim.AdamW(ref_ps, lr=0.01, weight_decay=0.1, foreach=False)
    for _ in range(4):
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
            master = st["master_param"]
            assert master.dtype == torch.float32 and st["exp_avg"].dtype == torch.float32
            assert torch.equal(p.detach(), master.to(dtype))
            torch.testing.assert_close(master, q.detach(), **FP32)
            torch.testing.assert_close(st["exp_avg_sq"], ref.state[q]["exp_avg_sq"], **FP32)
    assert "master_param" in ours.state_dict()["state"][0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_first_step_within_one_ulp(backend):
    params = make_params([(4097,), (5, 9), ()], dtype=torch.bfloat16)
    params.append(nn.Parameter(torch.randn(33)))  # fp32: rounded to nearest fp32
    ref_ps = [nn.Parameter(p.detach().float().clone()) for p in params]
    ours = AdamW(params, lr=1e-3, weight_decay=0.1, stochastic_rounding=True, backend=backend)
    ref = torch.optim.AdamW(ref_ps, lr=1e-3, weight_decay=0.1, foreach=False)
    grads = rand_grads(params)
    set_grads(params, grads)
    set_grads(ref_ps, [g.float() for g in grads])
    ours.step()
    ref.step()
    rtol, atol = FP32["rtol"], FP32["atol"]
    for p, q in zip(params, ref_ps):
        st = ours.state[p]
        assert "master_param" not in st and st["exp_avg"].dtype == torch.float32
        want = q.detach().double()
        if p.dtype == torch.float32:
            torch.testing.assert_close(p.detach(), q.detach(), **FP32)
            continue
        bound = SR_MAX_ULPS * spacing(torch.bfloat16, want) + atol + rtol * want.abs()
        assert ((p.detach().double() - want).abs() <= bound).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_keeps_tiny_updates(backend):
    """Updates far below half a bf16 ulp: round-to-nearest never moves the params (all
    stay 1.0), stochastic rounding moves them by the right amount on average."""
    n, n_steps, lr = 4096, 40, 1e-4
    drift = {}
    for sr in (False, True):
        p = nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        ours = Adam([p], lr=lr, stochastic_rounding=sr, backend=backend)
        for _ in range(n_steps):
            p.grad = torch.ones_like(p)  # every Adam step then moves by exactly -lr
            ours.step()
        drift[sr] = float(p.detach().double().mean()) - 1.0
    assert drift[False] == 0.0
    ulp = float(spacing(torch.bfloat16, torch.tensor(0.999)))
    sigma = ulp * math.sqrt(n_steps / 4 / n)  # each rounding adds variance <= ulp^2 / 4
    assert abs(drift[True] - (-n_steps * lr)) <= SR_MEAN_SIGMAS * sigma, drift
