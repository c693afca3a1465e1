"""torch.ops.dlopt.lion_step, per backend, against the float64 oracle written from the
paper's equations (tests/reference.py lion_float64) and, for low precision, against a
plain torch Lion at the same precision: dtypes, odd shapes, every flag, master weights,
stochastic rounding, GradScaler arguments, NaN-poisoned memory around what it writes, a
transposed grad, and torch.library.opcheck.

Lion's update is lr * sign(c): any rounding flips the sign of a c that is nearly 0. Most
tests therefore draw grads with |g| in [0.25, 0.5] (LION_GRADS), which keeps |c| >= 5e-3
for the betas and step counts used here (from zero momentum: |b1 m| <= b1 (1 - b2^t) 0.5
< (1 - b1) 0.25), so every element's sign is the oracle's; the test with unconstrained
grads compares elements whose |c| stayed above tolerances.SIGN_MARGIN.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from optim_op_helpers import (DEVICE_BACKENDS, DTYPES, STATE_CASES, STATE_IDS,
                              assert_fp32_close, assert_lowp_close, assert_poison_intact,
                              dtype_id, embed, embed_strided, shapes_for, SHAPES)
from reference import lion_float64
from tolerances import (SIGN_EXCLUDED_MAX, SIGN_MARGIN, SR_BIT_AGREEMENT, SR_MAX_ULPS,
                        SR_MEAN_SIGMAS, spacing, tol)

op = torch.ops.dlopt.lion_step


def lion_grads(params, n_steps, scale=1.0):
    """Fresh grads per step with |g| in [0.25, 0.5] * scale and a random sign."""
    out = []
    for _ in range(n_steps):
        gs = []
        for p in params:
            mag = torch.empty(p.shape, device=p.device).uniform_(0.25, 0.5)
            sign = torch.where(torch.rand(p.shape, device=p.device) < 0.5, -1.0, 1.0)
            gs.append((mag * sign * scale).to(p.dtype))
        out.append(gs)
    return out


def new_state(params, state_dtype=None, exp_avgs=None):
    return SimpleNamespace(
        m=[torch.zeros_like(p, dtype=state_dtype or p.dtype) for p in params]
        if exp_avgs is None else [m.clone() for m in exp_avgs],
        steps=[torch.zeros((), dtype=torch.float32, device=p.device) for p in params])


def run_op(params, grads_seq, backend, *, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0,
           maximize=False, state_dtype=None, masters=None, sr_seed=None, grad_scale=None,
           found_inf=None, lr_dtype=torch.float64, state=None):
    """len(grads_seq) op calls on clones of `params`; returns every tensor it owns."""
    params = [p.clone() for p in params]
    state = new_state(params, state_dtype) if state is None else state
    masters = [] if masters is None else [m.clone() for m in masters]
    lr_t = torch.tensor(lr, dtype=lr_dtype, device=params[0].device if params else "cpu")
    for grads in grads_seq:
        snapshot = [g.clone() for g in grads]
        op(params, grads, state.m, masters, state.steps, lr_t, betas[0], betas[1],
           weight_decay, maximize, grad_scale, found_inf, sr_seed, backend)
        for g, s in zip(grads, snapshot):  # grads are read-only
            assert torch.equal(g, s) or torch.equal(g.isnan(), s.isnan())
    return SimpleNamespace(params=params, masters=masters, **vars(state))


def torch_lion(params, grads_seq, *, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0,
               maximize=False, state_dtype=None):
    """A plain torch Lion (as lucidrains/lion-pytorch writes it) at the params' precision:
    the low-precision yardstick (there is no torch.optim.Lion)."""
    ps = [p.clone() for p in params]
    ms = [torch.zeros_like(p, dtype=state_dtype or p.dtype) for p in params]
    b1, b2 = betas
    for grads in grads_seq:
        for p, m, g in zip(ps, ms, grads):
            g = (-g if maximize else g).to(m.dtype)
            p.mul_(1 - lr * weight_decay)
            p.add_(m.mul(b1).add_(g, alpha=1 - b1).sign_().to(p.dtype), alpha=-lr)
            m.mul_(b2).add_(g, alpha=1 - b2)
    return ps, ms


def check_against_oracle(ours, params0, grads_seq, hp, state_dtype=None):
    """fp32: ours ~ the float64 oracle within the fp32 row of the table. bf16/fp16:
    ours' error vs the oracle at most LOWP_ERR_RATIO x the plain torch Lion's."""
    hp = dict(hp)
    lr, betas = hp.get("lr", 1e-2), hp.get("betas", (0.9, 0.99))
    wd, maximize = hp.get("weight_decay", 0.0), hp.get("maximize", False)
    n = len(grads_seq)
    ref_ps, ref_ms = torch_lion(params0, grads_seq, lr=lr, betas=betas, weight_decay=wd,
                                maximize=maximize, state_dtype=state_dtype)
    for i, p0 in enumerate(params0):
        # the oracle one step at a time: ulps are counted at the largest magnitude along
        # the trajectory (an error made at a larger value is not blown up by a later
        # cancellation)
        oracle, oracle_m = p0.double(), None
        scale, scale_m = p0.double().abs(), torch.zeros_like(p0, dtype=torch.float64)
        for g in grads_seq:
            oracle, oracle_m, _ = lion_float64(oracle, [g[i]], lr=lr, betas=betas,
                                               weight_decay=wd, maximize=maximize,
                                               exp_avg=oracle_m)
            scale = torch.maximum(scale, oracle.abs())
            scale_m = torch.maximum(scale_m, oracle_m.abs())
        got, got_m = ours.params[i], ours.m[i]
        assert got.dtype == p0.dtype and got.shape == p0.shape
        assert float(ours.steps[i]) == n
        if p0.dtype == torch.float32:
            assert_fp32_close(got.double(), oracle)
        else:
            assert_lowp_close(got, ref_ps[i], oracle, scale)
        if got_m.dtype == torch.float32:
            assert_fp32_close(got_m.double(), oracle_m)
        else:
            assert_lowp_close(got_m, ref_ms[i], oracle_m, scale_m, what="exp_avg")


# ------------------------------------------------------------------------- accuracy


# the shared odd shapes, with 70001 (3 CPU chunks, 2 interpreted Triton blocks) for 278011
LION_SHAPES = [name for name in SHAPES if name != "278011"] + ["70001"]


@pytest.mark.parametrize("shape_name", LION_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_shapes_match_oracle(device, backend, dtype, shape_name):
    shapes = [(70001,)] if shape_name == "70001" else shapes_for(shape_name, device, backend)
    n_steps = 2 if shape_name == "many_small" else 3
    params0 = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads_seq = lion_grads(params0, n_steps)
    hp = dict(lr=1e-2, weight_decay=0.1)
    ours = run_op(params0, grads_seq, backend, **hp)
    check_against_oracle(ours, params0, grads_seq, hp)


FLAGS = {
    "plain": dict(),
    "weight_decay": dict(weight_decay=0.5, lr_dtype=torch.float32),
    "maximize": dict(maximize=True, weight_decay=0.1),
    "betas": dict(betas=(0.5, 0.9), lr=3e-2, weight_decay=0.2),
    "beta1_zero": dict(betas=(0.0, 0.99), maximize=True),
}


# every flag in fp32, every storage case with two flags set (the maths does not depend on
# the storage, and the interpreter is slow)
FLAG_CASES = ([(f, torch.float32, None) for f in FLAGS]
              + [(f, d, s) for f in ("maximize", "betas") for d, s in STATE_CASES[1:]])


@pytest.mark.parametrize("flags,dtype,state_dtype", FLAG_CASES,
                         ids=[f"{f}-{i}" for f, i in zip(
                             (c[0] for c in FLAG_CASES),
                             [STATE_IDS[0]] * len(FLAGS) + STATE_IDS[1:] * 2)])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_flags_match_oracle(device, backend, dtype, state_dtype, flags):
    hp = dict(FLAGS[flags])
    lr_dtype = hp.pop("lr_dtype", torch.float64)
    params0 = [torch.randn(s, device=device).to(dtype) for s in [(4097,), (33, 7), ()]]
    grads_seq = lion_grads(params0, 4)
    ours = run_op(params0, grads_seq, backend, state_dtype=state_dtype, lr_dtype=lr_dtype, **hp)
    check_against_oracle(ours, params0, grads_seq, hp, state_dtype=state_dtype)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_mid_training_state_unconstrained_grads(device, backend):
    """From a random momentum, with N(0, 1) grads: every element whose |c| stayed above
    SIGN_MARGIN matches the oracle; few are excluded."""
    shapes = [(70001,), (129, 31)]
    params0 = [torch.randn(s, device=device) for s in shapes]
    m0 = [0.3 * torch.randn(s, device=device) for s in shapes]
    grads_seq = [[torch.randn(s, device=device) for s in shapes] for _ in range(3)]
    hp = dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=0.3)
    ours = run_op(params0, grads_seq, backend, state=new_state(params0, exp_avgs=m0), **hp)
    for i, p0 in enumerate(params0):
        oracle, oracle_m, min_c = lion_float64(p0, [g[i] for g in grads_seq], exp_avg=m0[i], **hp)
        keep = min_c > SIGN_MARGIN
        assert float(keep.double().mean()) >= 1 - SIGN_EXCLUDED_MAX
        assert_fp32_close(ours.params[i].double()[keep], oracle[keep])
        assert_fp32_close(ours.m[i].double(), oracle_m)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_zero_and_nan_grads(device, backend):
    """sign(0) = 0: a zero grad on zero momentum moves a param by weight decay only; a
    NaN grad makes that element (and its momentum) NaN, as torch.sign does, and no other."""
    p0 = torch.randn(4097, device=device)
    g = torch.zeros_like(p0)
    g[7] = float("nan")
    out = run_op([p0], [[g]], backend, lr=1e-2, weight_decay=0.5)
    want = p0 * (1 - 1e-2 * 0.5)
    nan = torch.zeros_like(p0, dtype=torch.bool)
    nan[7] = True
    assert torch.equal(out.params[0].isnan(), nan) and torch.equal(out.m[0].isnan(), nan)
    assert_fp32_close(out.params[0][~nan], want[~nan])
    assert torch.equal(out.m[0][~nan], torch.zeros_like(p0)[~nan])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_transposed_grad_and_param(device, backend):
    """A grad whose strides differ from its param's, and a transposed (non-contiguous
    but dense) param with a contiguous grad: same result as contiguous copies."""
    p0 = [torch.randn(37, 53, device=device), torch.randn(29, 41, device=device)]
    grads_seq = lion_grads(p0, 2)
    plain = run_op(p0, grads_seq, backend, weight_decay=0.1)
    params = [p0[0].clone(), p0[1].t().contiguous().t()]
    state = new_state(params)
    state.m[1] = state.m[1].t().contiguous().t()
    tgrads = [[g[0].t().contiguous().t(), g[1].contiguous()] for g in grads_seq]
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    for gs in tgrads:
        op(params, gs, state.m, [], state.steps, lr, 0.9, 0.99, 0.1, False, None, None, None,
           backend)
    for a, b in zip(params + state.m, plain.params + plain.m):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_lists(device, backend):
    op([], [], [], [], [], torch.tensor(1e-3, dtype=torch.float64), 0.9, 0.99, 0.0, False,
       None, None, None, backend)


# ------------------------------------------------------------------- GradScaler args


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_scale_unscales(device, backend):
    params0 = [torch.randn(s, device=device) for s in [(4097,), (7, 9)]]
    grads_seq = lion_grads(params0, 3)
    hp = dict(weight_decay=0.1, maximize=True)
    plain = run_op(params0, grads_seq, backend, **hp)
    for s in (2.0**12, 1000.5):  # any scale: the unscaled grads' signs and momentum
        scaled = run_op(params0, [[g * s for g in gs] for gs in grads_seq], backend, **hp,
                        grad_scale=torch.tensor(s, device=device))
        for a, b in zip(scaled.params + scaled.m, plain.params + plain.m):
            if s == 2.0**12:  # a power of two divides exactly: bit-identical
                assert torch.equal(a, b)
            else:
                assert_fp32_close(a, b)
    check_against_oracle(scaled, params0, grads_seq, hp)


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_found_inf_skips_everything(device, backend, master):
    dtype = torch.bfloat16 if master else torch.float32
    params0 = [torch.randn(s, device=device).to(dtype) for s in [(4097,), (), (0,)]]
    masters = [p.float() + 1e-3 * torch.randn_like(p.float()) for p in params0] if master else None
    state = SimpleNamespace(m=[torch.randn_like(p, dtype=torch.float32) for p in params0],
                            steps=[torch.full((), 3.0, device=device) for _ in params0])
    before = [t.clone() for t in state.m + state.steps]
    grads = lion_grads(params0, 1)
    out = run_op(params0, grads, backend, weight_decay=0.1, masters=masters, state=state,
                 found_inf=torch.tensor(1.0, device=device))
    for a, b in zip(out.params + out.masters, params0 + (masters or [])):
        assert torch.equal(a, b)
    for a, b in zip(out.m + out.steps, before):
        assert torch.equal(a, b)
    # found_inf == 0 is a normal step
    copy_state = SimpleNamespace(**{k: [t.clone() for t in v] for k, v in vars(state).items()})
    run_fi = run_op(params0, grads, backend, masters=masters, state=copy_state,
                    weight_decay=0.1, found_inf=torch.tensor(0.0, device=device))
    run_no = run_op(params0, grads, backend, masters=masters, state=state, weight_decay=0.1)
    for a, b in zip(run_fi.params + run_fi.m + run_fi.steps,
                    run_no.params + run_no.m + run_no.steps):
        assert torch.equal(a, b)
    assert float(run_no.steps[0]) == 4.0
    assert not torch.equal(run_no.params[0], params0[0])


# -------------------------------------------------------------------- poisoned memory


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_views_into_poisoned_buffers(device, backend, dtype):
    """Every tensor the op reads or writes is a view into a NaN-filled buffer: the op
    neither reads the NaNs (results equal a run on clean copies) nor writes outside the
    views (the poison is bit for bit unchanged). One param is a strided view."""
    n = 4097
    p0 = [torch.randn(n, device=device).to(dtype), torch.randn(n, device=device).to(dtype)]
    grads_seq = lion_grads(p0, 2)
    clean = run_op(p0, grads_seq, backend, weight_decay=0.1)
    bufs, views = [], {}
    for name, ts in (("p", p0), ("m", [torch.zeros_like(p) for p in p0])):
        views[name] = []
        for i, t in enumerate(ts):
            b, v = (embed_strided if (name == "p" and i == 1) else embed)(t)
            bufs.append((b, v, b.clone()))
            views[name].append(v)
    poisoned_grads = []
    for gs in grads_seq:
        row = []
        for g in gs:
            b, v = embed(g)
            bufs.append((b, v, b.clone()))
            row.append(v)
        poisoned_grads.append(row)
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    steps = [torch.zeros((), device=device) for _ in p0]
    for gs in poisoned_grads:
        op(views["p"], gs, views["m"], [], steps, lr, 0.9, 0.99, 0.1, False, None, None, None,
           backend)
    for a, b in zip(views["p"] + views["m"], clean.params + clean.m):
        assert torch.equal(a, b)
    assert_poison_intact(bufs)


# --------------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_master_weights(device, backend, dtype):
    """With fp32 masters the params are outputs only: poisoned with NaN before the first
    step, each step leaves param == master rounded to nearest, and the masters follow
    the float64 oracle as an fp32 param would."""
    shapes = [(4097,), (13, 5), (), (0,)]
    masters0 = [torch.randn(s, device=device) for s in shapes]
    params = [torch.full(s, float("nan"), device=device, dtype=dtype) for s in shapes]
    state = new_state(masters0)
    masters = [m.clone() for m in masters0]
    grads_seq = lion_grads(params, 3)
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    for gs in grads_seq:
        op(params, gs, state.m, masters, state.steps, lr, 0.9, 0.99, 0.1, False, None, None,
           None, backend)
        for p, m in zip(params, masters):
            assert torch.equal(p, m.to(dtype))
    for i, m0 in enumerate(masters0):
        oracle, oracle_m, _ = lion_float64(m0, [g[i] for g in grads_seq], lr=1e-2,
                                           weight_decay=0.1)
        assert_fp32_close(masters[i].double(), oracle)
        assert_fp32_close(state.m[i].double(), oracle_m)


# ---------------------------------------------------------------- stochastic rounding


def _sr_setup(device, shapes):
    """bf16 params, fp32 momentum from the middle of training (|m| <= 0.05, so the
    LION_GRADS margin still holds)."""
    params0 = [torch.randn(s, device=device).to(torch.bfloat16) for s in shapes]
    m0 = [torch.empty(s, device=device).uniform_(-0.05, 0.05) for s in shapes]
    return params0, m0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_within_one_ulp_of_fp32_update(device, backend):
    shapes = [(4097,), (0,), (31, 3), ()]
    params0, m0 = _sr_setup(device, shapes)
    grads = lion_grads(params0, 1)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
    out = run_op(params0, grads, backend, state=new_state(params0, exp_avgs=m0), sr_seed=seed,
                 lr=1e-3, weight_decay=0.1)
    rtol, atol = tol(torch.float32).values()
    for i, (got, p0) in enumerate(zip(out.params, params0)):
        want, want_m, _ = lion_float64(p0, [grads[0][i]], lr=1e-3, weight_decay=0.1,
                                       exp_avg=m0[i])
        assert got.dtype == torch.bfloat16
        bound = SR_MAX_ULPS * spacing(torch.bfloat16, want) + atol + rtol * want.abs()
        assert ((got.double() - want).abs() <= bound).all()
        assert_fp32_close(out.m[i].double(), want_m)  # exact fp32, not rounded to bf16
    assert not torch.equal(out.m[0], out.m[0].bfloat16().float())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_unbiased(device, backend):
    """One fixed fp32 value rounded stochastically many times (65536 elements x 4 seeds):
    the mean approaches the value; round-to-nearest would be > 100 sigma away."""
    n, n_seeds = 65536, 4
    lr = float(torch.empty(()).uniform_(0.5e-3, 3.5e-3))
    p0 = torch.ones(n, dtype=torch.bfloat16, device=device)
    g = torch.ones(n, dtype=torch.bfloat16, device=device)
    value = float(torch.tensor(1.0, dtype=torch.float32) - torch.tensor(lr, dtype=torch.float32))
    lo = float(torch.tensor(value).bfloat16().float())
    if lo > value:
        lo -= float(spacing(torch.bfloat16, torch.tensor(value)))
    ulp = float(spacing(torch.bfloat16, torch.tensor(lo)))
    q = (value - lo) / ulp
    assert 0.02 < q < 0.98, "the test value must sit between two bf16 values"
    results = []
    for _ in range(n_seeds):
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
        out = run_op([p0], [[g]], backend, lr=lr, state_dtype=torch.float32, sr_seed=seed)
        vals = out.params[0].double()
        assert ((vals == lo) | (vals == lo + ulp)).all(), "SR rounds to a neighbour"
        results.append(vals)
    mean = float(torch.cat(results).mean())
    sigma = ulp * math.sqrt(q * (1 - q) / (n * n_seeds))
    assert abs(mean - value) <= SR_MEAN_SIGMAS * sigma, (mean, value, sigma)


def _sr_pairs():
    bes = [b for d, b in DEVICE_BACKENDS if d == "cpu"]
    return [(a, b) for i, a in enumerate(bes) for b in bes[i + 1:]]


@pytest.mark.parametrize("backend_a,backend_b", _sr_pairs())
def test_sr_bits_agree_across_backends(backend_a, backend_b):
    """Same seed, same inputs: the backends draw the same random bits per (tensor,
    element), so the rounded bf16 bits agree on (nearly) every element."""
    shapes = [(4097,), (0,), (300, 7), (), (70001,)]
    params0, m0 = _sr_setup("cpu", shapes)
    grads = lion_grads(params0, 1)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    outs = [run_op(params0, grads, be, state=new_state(params0, exp_avgs=m0), sr_seed=seed,
                   weight_decay=0.1, lr=1e-3) for be in (backend_a, backend_b)]
    a = torch.cat([p.reshape(-1) for p in outs[0].params]).view(torch.int16)
    b = torch.cat([p.reshape(-1) for p in outs[1].params]).view(torch.int16)
    agree = float((a == b).double().mean())
    assert agree >= SR_BIT_AGREEMENT, f"{backend_a} vs {backend_b}: {agree:.4%} of bits agree"


# --------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_mismatched_lists_refused(device, backend):
    p = [torch.randn(5, device=device), torch.randn(3, device=device)]
    g = [torch.randn_like(t) for t in p]
    m = [torch.zeros_like(t) for t in p]
    steps = [torch.zeros((), device=device) for _ in p]
    lr = torch.tensor(1e-3, dtype=torch.float64, device=device)
    before = [t.clone() for t in p + m + steps]
    bad = {
        "grads length": (p, g[:1], m, [], steps),
        "exp_avgs shape": (p, g, [m[0], torch.zeros(4, device=device)], [], steps),
        "grads dtype": (p, [g[0].double(), g[1]], m, [], steps),
        "masters length": (p, g, m, [p[0].clone()], steps),
    }
    for what, (pp, gg, mm, ms, ss) in bad.items():
        with pytest.raises((RuntimeError, ValueError, TypeError)):
            op(pp, gg, mm, ms, ss, lr, 0.9, 0.99, 0.0, False, None, None, None, backend)
        for a, b in zip(p + m + steps, before):
            assert torch.equal(a, b), what


# --------------------------------------------------------------------------- opcheck


def _opcheck_samples(device, backend):
    def lists(shapes, dtype, state_dtype, master):
        ps = [torch.randn(s, device=device).to(dtype) for s in shapes]
        gs = [torch.randn(s, device=device).to(dtype) for s in shapes]
        ms = [torch.randn(s, device=device).to(state_dtype) * 0.1 for s in shapes]
        masters = [p.float() for p in ps] if master else []
        steps = [torch.full((), 2.0, device=device) for _ in shapes]
        return [ps, gs, ms, masters, steps]

    f64 = torch.tensor(1e-3, dtype=torch.float64, device=device)
    f32 = torch.tensor(1e-2, dtype=torch.float32, device=device)
    one = torch.tensor(1.0, device=device)
    return {
        "fp32": (*lists([(65,), (3, 4)], torch.float32, torch.float32, False), f64, 0.9, 0.99,
                 0.0, False, None, None, None, backend),
        "bf16_master_scaler": (*lists([(65,), ()], torch.bfloat16, torch.float32, True), f32,
                               0.9, 0.99, 0.1, False, torch.tensor(4.0, device=device),
                               0 * one, None, backend),
        "bf16_sr_maximize": (*lists([(65,), (2, 3)], torch.bfloat16, torch.float32, False), f64,
                             0.9, 0.99, 0.1, True, None, None,
                             torch.tensor(1234, dtype=torch.int64, device=device), backend),
        "fp16_states_fp16": (*lists([(65,)], torch.float16, torch.float16, False), f64, 0.5,
                             0.9, 0.1, False, None, None, None, backend),
    }


@pytest.mark.parametrize("sample", ["fp32", "bf16_master_scaler", "bf16_sr_maximize",
                                    "fp16_states_fp16"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend, sample):
    args = _opcheck_samples(device, backend)[sample]
    torch.library.opcheck(torch.ops.dlopt.lion_step.default, args)
