"""Helpers the drop-in optimizer tests share (tests/optim/test_*.py): twin runs against
the torch.optim class of the same name, state comparison, the checks every optimizer
runs alike (torch.compile of the step, checkpoints both ways, param groups with late
grads, closures, odd params, GradScaler, master weights, stochastic rounding, refused
input), snapshots for "a refused call changes nothing", PyTorch's optimizer test
database, and a small training task. Each test file passes what is specific to its
optimizer (constructor arguments, state keys). Not a test module."""
from __future__ import annotations

import contextlib
import copy
import io
import math
import pathlib
import re

import pytest
import torch
from torch import nn

from conftest import GPU
from tolerances import (FP32_ORACLE_RATIO, FP32_ORACLE_STATE_RATIO, SR_MEAN_SIGMAS, TRAIN_LOSS_MAX_FRACTION,
                        TRAIN_LOSS_RTOL, spacing, sr_bound, tol)

FP32 = tol(torch.float32)
SHAPES = [(7, 13), (13,), (3, 7), (3,), ()]
OUR_EXTRAS = ("backend", "master_weights", "stochastic_rounding")


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
    return {k: v for k, v in kwargs.items() if k not in OUR_EXTRAS}


def assert_near_oracle(got, ref, oracle, floor, ratio=FP32_ORACLE_RATIO):
    """Our largest error against the float64 `oracle` is at most `ratio` times torch's
    own fp32 error (`ref`'s), or times `floor` if that is larger."""
    o = oracle.detach()
    err_ours = float((got.detach().double() - o).abs().max()) if o.numel() else 0.0
    err_ref = float((ref.detach().double() - o).abs().max()) if o.numel() else 0.0
    assert err_ours <= ratio * max(err_ref, floor), (err_ours, err_ref, floor)


def assert_params_near_oracle(ps_ours, ps_ref, ps_oracle, tolerance=FP32):
    """For trajectories that amplify fp32 rounding (RMSprop centered: v - grad_avg^2
    cancels), ours need not match torch element by element: per param, our largest error
    against a float64 run of the same training is at most FP32_ORACLE_RATIO times torch's
    own fp32 error, or times the fp32 tolerance at the param's scale if that is larger
    (atol + rtol * max |param|: on rare draws both errors sit at that level, and ours,
    rounded differently from torch's, was over twice torch's there, on the pure-torch
    reference backend too)."""
    for a, b, o in zip(ps_ours, ps_ref, ps_oracle):
        scale = float(b.detach().abs().max()) if b.numel() else 0.0
        assert_near_oracle(a, b, o, tolerance["atol"] + tolerance["rtol"] * scale)


def assert_same_training(ours, ps_ours, ref, ps_ref, tolerance=FP32, normwise=True,
                         ps_oracle=None, states_oracle=None):
    """Params and every state tensor torch keeps agree; the same state keys (ours may
    add master_param) and dtypes; params torch keeps no state for have none here.
    States are compared normwise (the absolute tolerance scaled by the tensor's largest
    |value|): a state such as RMSprop's momentum buffer sums large terms that cancel,
    and fp32 rounding bounds its error relative to the tensor's scale, not per element.
    normwise=False compares them element by element (Adam's states do not cancel).
    ps_oracle (float64 params of the same training): params are judged against it
    (assert_params_near_oracle) instead of element by element against torch;
    states_oracle (its per-param state dicts): a state that misses torch's beyond the
    tolerance must then be as close to the float64 one as torch's is (assert_near_oracle,
    the normwise tolerance as the floor): a state fed by the cancelling division
    (centered RMSprop's momentum buffer) strays from torch's fp32 one on rare draws, on
    the pure-torch reference backend too, while staying as close to float64 as torch's.
    Either judge alone fails a wrong state."""
    if ps_oracle is not None:
        assert_params_near_oracle(ps_ours, ps_ref, ps_oracle, tolerance)
    for i, (a, b) in enumerate(zip(ps_ours, ps_ref)):
        if ps_oracle is None:
            torch.testing.assert_close(a.detach(), b.detach(), **tolerance)
        sa, sb = ours.state.get(a, {}), ref.state.get(b, {})
        assert set(sb) <= set(sa) and set(sa) - set(sb) <= {"master_param"}, (set(sa), set(sb))
        for key, want in sb.items():
            got = sa[key]
            if key == "step":
                assert float(got) == float(want)
            else:
                assert got.dtype == want.dtype, key
                scale = float(want.abs().max()) if want.numel() else 0.0
                kw = (dict(rtol=tolerance["rtol"],
                           atol=tolerance["atol"] + tolerance["rtol"] * scale)
                      if normwise else tolerance)
                if states_oracle is None:
                    torch.testing.assert_close(got, want, **kw)
                elif not torch.allclose(got, want, **kw):
                    assert_near_oracle(got, want, states_oracle[i][key],
                                       tolerance["atol"] + tolerance["rtol"] * scale,
                                       FP32_ORACLE_STATE_RATIO)
    assert len(ours.state_dict()["state"]) == len(ref.state_dict()["state"])


def twin_run(cls, twin_cls, kwargs, params, n_steps, ours=None, ref=None, ps_ref=None,
             grad_scales=None, normwise=True, tolerance=FP32):
    """Build (or continue) ours and the torch twin (for-loop implementation) on the same
    params and grads, comparing after every step (normwise: see assert_same_training)
    within `tolerance` (the fp32 row of the table unless told)."""
    ps_ref = clone_params(params) if ps_ref is None else ps_ref
    ours = cls(params, **kwargs) if ours is None else ours
    if ref is None:
        ref = twin_cls(ps_ref, **dict(torch_kwargs(kwargs), foreach=False))
    for k in range(n_steps):
        s = 1.0 if grad_scales is None else grad_scales[k % len(grad_scales)]
        grads = rand_grads(params, s)
        set_grads(params, grads)
        set_grads(ps_ref, grads)
        ours.step()
        ref.step()
        assert_same_training(ours, params, ref, ps_ref, tolerance, normwise=normwise)
    return ours, ref, ps_ref


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


# --------------------------------------------------- "a refused call changes nothing"
def _bits(t):
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.clone()


def snapshot(params, opt=None):
    return {
        "params": [_bits(p) for p in params],
        "grads": [None if p.grad is None else _bits(p.grad) for p in params],
        "state": None if opt is None else {
            i: {k: _bits(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
            for i, st in opt.state_dict()["state"].items()},
        "groups": None if opt is None else copy.deepcopy(
            [{k: v for k, v in g.items() if k != "params"} | {"n": len(g["params"])}
             for g in opt.param_groups]),
    }


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8) if a.numel() else a,
                                b.reshape(-1).view(torch.uint8) if b.numel() else b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def assert_unchanged(before, params, opt=None):
    after = snapshot(params, opt)
    for key in before:
        assert _same(before[key], after[key]), f"{key} changed by a refused call"


def assert_construction_refused(cls, params, kwargs, exc, name):
    """cls(params, **kwargs) raises `exc` whose message names `name`, and changes nothing."""
    real = [p for p in params if p.device.type != "meta"]
    before = snapshot(real)
    with pytest.raises(exc, match=rf"\b{name}"):
        cls(params, **kwargs)
    assert_unchanged(before, real)


# ----------------------------------------------- PyTorch's optimizer test database
def optim_db_configs(name):
    """Every kwargs combination torch's optim_db tries for optimizer `name` (cpu and
    cuda inputs, with the global foreach / fused / differentiable flags), deduplicated,
    as pytest params (kwargs,)."""
    co = pytest.importorskip("torch.testing._internal.common_optimizers")
    info = next(i for i in co.optim_db if i.optim_cls.__name__ == name)
    out, seen = [], set()
    for device in ("cpu", "cuda"):
        inputs = list(info.optim_inputs_func(device=device))
        inputs += co._get_optim_inputs_including_global_cliquey_kwargs(device, torch.float32, info)
        for oi in inputs:
            key = repr(sorted((k, repr(v)) for k, v in oi.kwargs.items()))
            if key not in seen:
                seen.add(key)
                out.append(pytest.param(oi.kwargs, id=f"{device}-{oi.desc}"))
    return out


def optim_db_error_inputs(name):
    co = pytest.importorskip("torch.testing._internal.common_optimizers")
    info = next(i for i in co.optim_db if i.optim_cls.__name__ == name)
    out = [pytest.param(ei, id=ei.optimizer_error_input.desc)
           for ei in info.optim_error_inputs_func(device="cpu", dtype=torch.float32)]
    # the cuda-only error inputs, with a CPU param (the rules do not depend on the device)
    kws = [({"foreach": True, "fused": True}, "`fused` and `foreach`"),
           ({"fused": True, "differentiable": True}, "`fused` does not support")]
    if "fused" in info.supported_impls:
        for kw, regex in kws:
            ei = co.ErrorOptimizerInput(co.OptimizerInput(params=[torch.empty(())], kwargs=kw,
                                                          desc=regex),
                                        error_type=RuntimeError, error_regex=regex)
            out.append(pytest.param(ei, id=f"cuda-{'-'.join(kw)}"))
    return out


def reference_kwargs(kwargs, dtype=torch.float32):
    """The same maths in torch's for-loop implementation on CPU tensors (capturable and
    the implementation flags do not change the result; tensor betas as floats). For
    float64 / complex128 params a tensor lr goes to torch as float64: with a float32 one,
    torch computes lr / bias_correction as a float32 tensor, rounding the step size to
    float32, where ours keeps it in double (docs/compat.md)."""
    ref = {k: v for k, v in kwargs.items()
           if k not in ("foreach", "fused", "capturable", "differentiable")}
    if dtype in (torch.float64, torch.complex128) and isinstance(ref.get("lr"), torch.Tensor):
        ref["lr"] = ref["lr"].double()
    if "betas" in ref:
        ref["betas"] = tuple(float(b) if isinstance(b, torch.Tensor) else b
                             for b in ref["betas"])
    return ref


def optim_db_dtypes(name, cls):
    """The param dtypes to run optimizer `name`'s optim_db configs in: float32 and
    float64, and complex64 where torch's OptimizerInfo says it supports complex params
    (and ours takes them), as pytest params."""
    co = pytest.importorskip("torch.testing._internal.common_optimizers")
    info = next(i for i in co.optim_db if i.optim_cls.__name__ == name)
    dtypes = [torch.float32, torch.float64]
    if info.supports_complex and cls._complex_params:
        dtypes.append(torch.complex64)
    return [pytest.param(d, id=str(d).replace("torch.", "")) for d in dtypes]


def run_optim_db_config(cls, twin_cls, kwargs, refused, normwise=True, dtype=torch.float32):
    """Ours either trains like torch for 3 steps or refuses with an error naming the
    argument (refused: kwarg -> reason; docs/compat.md lists them), on params of `dtype`
    (at its row of the tolerance table; complex64 at float32's). normwise: see
    assert_same_training."""
    kwargs = copy.deepcopy(kwargs)
    params = [nn.Parameter(torch.randn(s, dtype=dtype)) for s in [(5, 3), (3,), (), (4, 1)]]
    tolerance = tol(torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32)
    bad = next((k for k in refused if kwargs.get(k)), None)
    if bad:
        assert_construction_refused(cls, params, kwargs, (ValueError, TypeError), bad)
        return
    ours = cls(params, **kwargs)
    ps_ref = clone_params(params)
    ref = twin_cls(ps_ref, **reference_kwargs(kwargs, dtype), foreach=False)
    for _ in range(3):
        set_grads(params, rand_grads(params))
        set_grads(ps_ref, [p.grad for p in params])
        ours.step()
        ref.step()
        assert_same_training(ours, params, ref, ps_ref, tolerance, normwise=normwise)


def check_optim_db_error_input(cls, error_input):
    """Ours raises an error of (a subclass of) the type torch raises, or a ValueError /
    TypeError naming the offending argument; warnings are warned alike."""
    co = pytest.importorskip("torch.testing._internal.common_optimizers")
    oi = error_input.optimizer_error_input
    kwargs = copy.deepcopy(oi.kwargs)

    def trigger():
        opt = cls(oi.params, **kwargs)
        if error_input.error_on == co.OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            trigger()
        return
    with pytest.raises(Exception) as info:
        trigger()
    exc = info.value
    if isinstance(exc, error_input.error_type):
        return
    assert isinstance(exc, (ValueError, TypeError)), f"{type(exc).__name__}: {exc}"
    named = list(kwargs) or ["param"]
    assert any(re.search(rf"\b{re.escape(k)}", str(exc)) for k in named), (
        f"the error must name one of {named}: {exc}")


# ------------------------------------------------------------------ training check
def train_regression(make_opt, steps=60, seed=0):
    """A 2-layer MLP fit to a fixed random teacher on synthetic data (fixed seed, so
    ours and torch see the same data and init); returns the final full-batch loss."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=gen)
    teacher = torch.randn(8, 4, generator=gen)
    y = torch.tanh(x @ teacher)
    torch.manual_seed(seed)
    model = mlp()
    opt = make_opt(model.parameters())
    for k in range(steps):
        xb, yb = x[(k * 32) % 256:][:32], y[(k * 32) % 256:][:32]
        opt.zero_grad()
        (model(xb) - yb).square().mean().backward()
        opt.step()
    with torch.no_grad():
        return float((model(x) - y).square().mean()), float(y.square().mean())


COMPAT_DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "compat.md"


def assert_refusals_documented(refused):
    """Every refusal of an optim_db config is listed in docs/compat.md."""
    text = COMPAT_DOC.read_text()
    for flag in refused:
        assert f"{flag}=True" in text, f"docs/compat.md must list the refusal of {flag}=True"


def check_trains_like(make_ours, make_theirs):
    """train_regression with ours and with the yardstick: the final losses agree to
    TRAIN_LOSS_RTOL, and ours has learned (TRAIN_LOSS_MAX_FRACTION of the target)."""
    ours, scale = train_regression(make_ours)
    theirs, _ = train_regression(make_theirs)
    assert abs(ours - theirs) <= TRAIN_LOSS_RTOL * theirs, (ours, theirs)
    assert ours <= TRAIN_LOSS_MAX_FRACTION * scale, (ours, scale)


# ------------------------------------------- PyTorch's optimizer test database, as tests
def optim_db_tests(cls, twin_cls, refused):
    """The three optim_db tests of an optimizer with a torch twin, for its test module to
    bind as test_optim_db_config, test_refusals_are_documented, test_optim_db_error_input:
    every config torch tries trains like torch (or is refused, naming the argument) with
    float32, float64 and (where torch and ours take them) complex64 params, every
    refusal is in docs/compat.md, every bad input torch refuses is refused here too."""
    name = twin_cls.__name__

    @pytest.mark.parametrize("dtype", optim_db_dtypes(name, cls))
    @pytest.mark.parametrize("kwargs", optim_db_configs(name))
    def test_optim_db_config(kwargs, dtype):
        run_optim_db_config(cls, twin_cls, kwargs, refused, dtype=dtype)

    def test_refusals_are_documented():
        assert_refusals_documented(refused)

    @pytest.mark.parametrize("error_input", optim_db_error_inputs(name))
    def test_optim_db_error_input(error_input):
        check_optim_db_error_input(cls, error_input)

    return test_optim_db_config, test_refusals_are_documented, test_optim_db_error_input


# ------------------------------------------------------------------ shared behaviours
def assert_defaults_match(ours_cls, twin_cls):
    """ours' defaults hold every default torch's class has, with torch's value."""
    p = [nn.Parameter(torch.zeros(2))]
    ours, ref = ours_cls(p), twin_cls(p)
    for key, value in ref.defaults.items():
        assert ours.defaults[key] == value, key


def check_compiled_step_matches_eager(make, n_steps=4, master_groups=(1,), max_new_graphs=2):
    """A training step whose optimizer step is torch.compile(fullgraph=True)'d (forward
    and backward stay eager, as torch's own compiled-optimizer recipe does) gives the
    eager result bit for bit. make(model) builds the optimizer over mlp() with model[2]
    in bf16, from groups [model[0] params, model[2] params] sharing a tensor lr, which
    is changed in place between steps (as a scheduler would): that must not recompile
    (one graph for the first step, where state is created, one for every later step;
    max_new_graphs=None skips the count). Groups in master_groups keep an fp32 master
    that the bf16 params equal, rounded, after every step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = mlp()
    model[2].to(torch.bfloat16)
    twin = copy.deepcopy(model)
    opt, opt_eager = make(model), make(twin)
    compiled_step = torch.compile(opt.step, fullgraph=True)
    graphs_before = counters["stats"]["unique_graphs"]
    for i in range(n_steps):
        x = torch.randn(5, 8)
        for m, o, step in ((model, opt, compiled_step), (twin, opt_eager, opt_eager.step)):
            o.zero_grad()
            m[2](m[1](m[0](x)).bfloat16()).float().square().mean().backward()
            step()
            o.defaults["lr"].mul_(0.7)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q), f"step {i}"
        for g in master_groups:
            for p in opt.param_groups[g]["params"]:
                assert torch.equal(p, opt.state[p]["master_param"].to(p.dtype))
    if max_new_graphs is not None:
        assert counters["stats"]["unique_graphs"] - graphs_before <= max_new_graphs


def _checkpoint_handover(make_first, make_second, params):
    """make_first(params) trains 3 steps and saves; make_second(fresh params) loads that
    checkpoint (through torch.save / load). Returns both, the fresh params and the
    checkpoint."""
    first = make_first(params)
    for _ in range(3):
        set_grads(params, rand_grads(params))
        first.step()
    sd = roundtrip(first.state_dict())
    fresh = clone_params(params)
    second = make_second(fresh)
    second.load_state_dict(sd)
    return first, second, fresh, sd


def check_torch_checkpoint_into_ours(make_ref, make_ours, params, group_keys, normwise=True,
                                     tolerance=FP32):
    """torch (make_ref(params)) trains 3 steps and saves; ours (make_ours on fresh params,
    with other hyperparameters) loads that checkpoint, takes the groups' hyperparameters
    (group_keys) from it and continues exactly as torch continues. Returns ours and its
    params."""
    ref, ours, mine, _ = _checkpoint_handover(make_ref, make_ours, params)
    for g_ours, g_ref in zip(ours.param_groups, ref.param_groups):
        for key in group_keys:
            assert g_ours[key] == g_ref[key], key
    assert_same_training(ours, mine, ref, params, tolerance, normwise=normwise)
    twin_run(None, None, {}, mine, 3, ours=ours, ref=ref, ps_ref=params, normwise=normwise,
             tolerance=tolerance)
    return ours, mine


def check_ours_checkpoint_into_torch(make_ours, make_ref, params, normwise=True, tolerance=FP32):
    """Ours trains 3 steps and saves; torch (make_ref on fresh params, with other
    hyperparameters) loads that checkpoint and continues exactly as ours continues.
    Returns the (round-tripped) checkpoint."""
    ours, ref, theirs, sd = _checkpoint_handover(make_ours, make_ref, params)
    assert_same_training(ours, params, ref, theirs, tolerance, normwise=normwise)
    twin_run(None, None, {}, params, 3, ours=ours, ref=ref, ps_ref=theirs, normwise=normwise,
             tolerance=tolerance)
    return sd


def check_checkpoint_resumes_exactly(make, make_resumed, params, *, fp32_states=True,
                                     grads=rand_grads, reseed=False):
    """Ours (make(params)) trains 2 steps; its state_dict, through torch.save / load, goes
    into make_resumed(fresh params) (other hyperparameters); both take 2 more steps on the
    same grads and agree bit for bit: params, and every state tensor with its dtype and
    shape. fp32_states: every state tensor but 'step' is fp32 in the state_dict (an fp32
    master copy or fp32 states of low-precision params come back at fp32; torch's loader
    would cast them to the param dtype). reseed: the same stochastic-rounding seed for
    both. Returns ours, resumed and the round-tripped state_dict."""
    ours = make(params)
    for _ in range(2):
        set_grads(params, grads(params))
        ours.step()
    sd = roundtrip(ours.state_dict())
    if fp32_states:
        for i, st in sd["state"].items():
            for key, value in st.items():
                if key != "step":
                    assert value.dtype == torch.float32, (i, key)
    mine = clone_params(params)
    resumed = make_resumed(mine)
    resumed.load_state_dict(sd)
    for k in range(2):
        gs = grads(params)
        set_grads(params, gs)
        set_grads(mine, gs)
        if reseed:
            torch.manual_seed(k)
        ours.step()
        if reseed:
            torch.manual_seed(k)
        resumed.step()
    for p, q in zip(params, mine):
        assert torch.equal(p, q)
        assert resumed.state[q].keys() == ours.state[p].keys()
        for key, value in ours.state[p].items():
            got = resumed.state[q][key]
            assert got.dtype == value.dtype and got.shape == value.shape, key
            assert torch.equal(got, value), key
    return ours, resumed, sd


def twin_groups(twin_cls, groups, **kwargs):
    """The torch twin (for-loop implementation) over clones of `groups`' params, and
    those params in order."""
    ref = twin_cls([dict(g, params=clone_params(g["params"])) for g in groups], **kwargs,
                   foreach=False)
    return ref, [p for g in ref.param_groups for p in g["params"]]


def twin_run_late_grads(ours, params, ref, ps_ref, n_steps=4, normwise=True):
    """Steps ours and torch on the same grads, comparing after every step, where
    params[1] never gets a grad and params[3] gets its first at step 3."""
    for k in range(n_steps):
        grads = rand_grads(params)
        grads[1] = None  # never a grad
        if k < 2:
            grads[3] = None  # a grad from step 3 on
        set_grads(params, grads)
        set_grads(ps_ref, grads)
        ours.step()
        ref.step()
        assert_same_training(ours, params, ref, ps_ref, normwise=normwise)


def check_closure_matches_torch(model, twin, ours, ref, n_steps, *, add_group_at=None,
                                group=None, no_grad=False, normwise=True):
    """step(closure) on ours and torch: the closure is called once per step, the losses
    and the training agree. add_group_at: the step before which model[2]'s params join as
    a new group with `group`'s hyperparameters. no_grad: the step is called under
    torch.no_grad() (step enables grad for the closure, as torch does)."""
    for k in range(n_steps):
        if k == add_group_at:
            ours.add_param_group({"params": model[2].parameters(), **group})
            ref.add_param_group({"params": twin[2].parameters(), **group})
        x, y = torch.randn(6, 8), torch.randn(6, 4)
        calls = []

        def closure():
            calls.append(1)
            ours.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            return loss

        def closure_ref():
            ref.zero_grad()
            loss = (twin(x) - y).square().mean()
            loss.backward()
            return loss

        with torch.no_grad() if no_grad else contextlib.nullcontext():
            loss = ours.step(closure)
        assert len(calls) == 1
        torch.testing.assert_close(loss, ref.step(closure_ref), **FP32)
        assert_same_training(ours, list(model.parameters()), ref, list(twin.parameters()),
                             normwise=normwise)


def check_odd_params_like_torch(cls, twin_cls, kwargs, backend):
    """Zero-size and 0-dim params, a transposed param and a transposed grad train like
    torch for 3 steps, and the transposed param keeps its strides."""
    params = [nn.Parameter(torch.randn(s)) for s in [(0,), (), (3, 0), (5,)]]
    params.append(nn.Parameter(torch.randn(7, 5).t()))
    params.append(nn.Parameter(torch.randn(5, 7)))
    ps_ref = clone_params(params)
    ours = cls(params, **kwargs, backend=backend)
    ref = twin_cls(ps_ref, **kwargs, foreach=False)
    for _ in range(3):
        grads = rand_grads(params)
        grads[-1] = torch.randn(7, 5).t()
        set_grads(params, grads)
        set_grads(ps_ref, grads)
        ours.step()
        ref.step()
        assert_same_training(ours, params, ref, ps_ref)
    assert params[4].stride() == (1, 5)


def check_grad_scaler_matches_torch(ours, ref, model, twin, n_iters, overflow_at, *,
                                    unscale_clip=False, after_iter=None, normwise=True,
                                    oracle=None):
    """torch.amp.GradScaler (same settings for both) drives ours (which takes grad_scale /
    found_inf, or found_inf only after scaler.unscale_) and torch's `ref` (its grads
    unscaled by the scaler and its step skipped on overflow, or torch's fused step). At
    the iterations in overflow_at one grad element is inf: ours' step then changes no
    param and no state (steps included). Scales and training agree after every
    iteration; after_iter(it) runs then. unscale_clip: scaler.unscale_ and
    clip_grad_norm_(1.0) before the step. oracle: (float64 model, its torch optimizer),
    trained alongside without a scaler (skipping the overflow steps); params are then
    judged against it (assert_params_near_oracle)."""
    assert oracle is None or not unscale_clip
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=2)
               for _ in range(2)]
    for it in range(n_iters):
        x = torch.randn(5, 8)
        for m, o, sc in ((model, ours, scalers[0]), (twin, ref, scalers[1])):
            o.zero_grad()
            sc.scale(m(x).square().mean()).backward()
            if it in overflow_at:
                next(m.parameters()).grad[0, 0] = float("inf")
            before = snapshot(list(m.parameters()), o) if (o is ours and it in overflow_at) \
                else None
            if unscale_clip:
                sc.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            sc.step(o)
            sc.update()
            if before is not None:
                assert_unchanged({k: before[k] for k in ("params", "state")},
                                 list(m.parameters()), o)
        ps_oracle = states_oracle = None
        if oracle is not None:
            m64, o64 = oracle
            o64.zero_grad()
            m64(x.double()).square().mean().backward()
            if it not in overflow_at:
                o64.step()
            ps_oracle = list(m64.parameters())
            states_oracle = [o64.state.get(p, {}) for p in ps_oracle]
        if after_iter is not None:
            after_iter(it)
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_same_training(ours, list(model.parameters()), ref, list(twin.parameters()),
                             normwise=normwise, ps_oracle=ps_oracle,
                             states_oracle=states_oracle)


def _fp32_twin(cls, twin_cls, params, kwargs, twin_dtype=torch.float32, **ours_kwargs):
    """Ours on (low-precision) params, and torch's twin on fp32 (or twin_dtype) copies."""
    ref_ps = [nn.Parameter(p.detach().to(twin_dtype).clone()) for p in params]
    return (cls(params, **kwargs, **ours_kwargs), twin_cls(ref_ps, **kwargs, foreach=False),
            ref_ps)


def _step_upcast(ours, params, ref, ref_ps):
    """One step of both on the same grads (upcast to the twin's dtype)."""
    grads = rand_grads(params)
    set_grads(params, grads)
    set_grads(ref_ps, [g.to(q.dtype) for g, q in zip(grads, ref_ps)])
    ours.step()
    ref.step()


def check_master_weights_match_twin(cls, twin_cls, kwargs, dtype, backend, state_keys, *,
                                    n_steps=3, shapes=SHAPES, optional_keys=False,
                                    twin_dtype=torch.float32):
    """Low-precision params (and one fp32 param) with master_weights=True: after every
    step each low-precision param equals its fp32 master rounded, and the masters and
    the states in state_keys follow torch's fp32 twin on the same (upcast) grads; the
    fp32 param gets no master and trains like torch. optional_keys: compare only the
    state_keys torch keeps for that param. twin_dtype=torch.float64 judges against a
    float64 run of torch's twin instead, for maths whose fp32 rounding torch's own fp32
    run amplifies (then torch's fp32 twin, not ours, strays from the float64 run)."""
    params = make_params(shapes, dtype=dtype) + [nn.Parameter(torch.randn(9))]
    ours, ref, ref_ps = _fp32_twin(cls, twin_cls, params, kwargs, twin_dtype,
                                   master_weights=True, backend=backend)
    for _ in range(n_steps):
        _step_upcast(ours, params, ref, ref_ps)
        for p, q in zip(params, ref_ps):
            st = ours.state[p]
            if p.dtype == torch.float32:
                assert "master_param" not in st
                torch.testing.assert_close(p.detach(), q.detach().float(), **FP32)
                continue
            master = st["master_param"]
            assert master.dtype == torch.float32
            assert torch.equal(p.detach(), master.to(dtype))
            torch.testing.assert_close(master, q.detach().float(), **FP32)
            for key in state_keys:
                if optional_keys and key not in ref.state[q]:
                    continue
                torch.testing.assert_close(st[key], ref.state[q][key].float(), **FP32)
    assert "master_param" in ours.state_dict()["state"][0]


def check_sr_first_step_within_one_ulp(cls, twin_cls, kwargs, backend, state_key=None, *,
                                       shapes=((4097,), (5, 9), ()), fp32_param=False):
    """bf16 params with stochastic_rounding=True: after the first step each lies within
    tolerances.sr_bound of torch's fp32 twin on the same (upcast) grads; no master copy,
    and the state `state_key` is fp32. fp32_param: an fp32 param in the same optimizer
    is rounded to nearest (trains like torch's)."""
    params = make_params(list(shapes), dtype=torch.bfloat16)
    if fp32_param:
        params.append(nn.Parameter(torch.randn(33)))
    ours, ref, ref_ps = _fp32_twin(cls, twin_cls, params, kwargs, stochastic_rounding=True,
                                   backend=backend)
    _step_upcast(ours, params, ref, ref_ps)
    for p, q in zip(params, ref_ps):
        st = ours.state[p]
        assert "master_param" not in st
        if state_key is not None:
            assert st[state_key].dtype == torch.float32
        if p.dtype == torch.float32:
            torch.testing.assert_close(p.detach(), q.detach(), **FP32)
            continue
        want = q.detach().double()
        assert ((p.detach().double() - want).abs() <= sr_bound(want)).all()


def sr_drift(make_opt, start, n=4096, n_steps=40, check=None):
    """bf16 params all equal to `start`, stepped n_steps times with unit grads by
    make_opt([p], stochastic_rounding); returns {stochastic_rounding: mean drift}.
    check(opt, p, sr) runs after each run."""
    drift = {}
    for sr in (False, True):
        p = nn.Parameter(torch.full((n,), start, dtype=torch.bfloat16))
        opt = make_opt([p], sr)
        for _ in range(n_steps):
            p.grad = torch.ones_like(p)
            opt.step()
        drift[sr] = float(p.detach().double().mean()) - start
        if check is not None:
            check(opt, p, sr)
    return drift


def assert_sr_drift_unbiased(drift, n, n_steps, lr):
    """Every step moves each element by exactly -lr, far below half a bf16 ulp at 1.0:
    round-to-nearest never moves (drift 0), stochastic rounding moves by -n_steps * lr
    on average, within SR_MEAN_SIGMAS (each rounding adds variance <= ulp^2 / 4)."""
    assert drift[False] == 0.0
    ulp = float(spacing(torch.bfloat16, torch.tensor(0.999)))
    sigma = ulp * math.sqrt(n_steps / 4 / n)
    assert abs(drift[True] - (-n_steps * lr)) <= SR_MEAN_SIGMAS * sigma, drift


# ------------------------------------------------------------------------ refused input
COMMON_CONSTRUCTION = {
    # id: (kwargs, exception type, argument the message names), for every optimizer
    "lr_negative": (dict(lr=-1e-3), ValueError, "lr"),
    "lr_nan": (dict(lr=float("nan")), ValueError, "lr"),
    "lr_tensor_two_elements": (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "lr"),
    "lr_string": (dict(lr="0.01"), TypeError, "lr"),
    "weight_decay_negative": (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    "master_and_sr": (dict(master_weights=True, stochastic_rounding=True), ValueError,
                      "stochastic_rounding"),
    "unknown_backend": (dict(backend="bogus"), ValueError, "backend"),
}
if not GPU:
    COMMON_CONSTRUCTION["unavailable_backend_cuda"] = (dict(backend="cuda"), ValueError,
                                                       "backend")


def construction_cases(specific):
    """COMMON_CONSTRUCTION and an optimizer's own cases (the same layout, or (kwargs,
    params factory, exc, name) for a case that needs its own params)."""
    return {**COMMON_CONSTRUCTION, **specific}


def check_construction_case(cls, case, shapes=SHAPES):
    """One (kwargs, exc, name) case, refused on params with grads, or (kwargs, make, exc,
    name), refused on the params make() returns; either way changing nothing."""
    kwargs, exc, name = case[0], case[-2], case[-1]
    if len(case) == 4:
        params = case[1]()
    else:
        params = make_params(shapes)
        set_grads(params, rand_grads(params))
    assert_construction_refused(cls, params, kwargs, exc, name)


def check_refused_group_and_sparse_step(make_opt, params, bad_groups):
    """make_opt(params[:3]) after 2 steps: each bad group ({kwargs}, exc, match) is refused
    by add_param_group, and a sparse grad by step, changing nothing (params, grads,
    state, groups)."""
    opt = make_opt(params[:3])
    for _ in range(2):
        set_grads(params, rand_grads(params))
        opt.step()
    before = snapshot(params, opt)
    for group, exc, match in bad_groups:
        with pytest.raises(exc, match=match):
            opt.add_param_group({"params": params[3:], **group})
        assert_unchanged(before, params, opt)
    params[1].grad = params[1].grad.to_sparse()
    before = snapshot(params, opt)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert_unchanged(before, params, opt)
