"""torch.ops.dlopt.rmsprop_step, per backend: against torch.optim.RMSprop (same dtype) and
the float64 oracle (tests/reference.py), over dtypes, odd shapes and every flag
(centered, momentum, weight decay, maximize); resuming from non-zero states, master
weights, stochastic rounding, GradScaler arguments, poisoned memory around the tensors
it writes, and torch.library.opcheck.

Tolerances come from tests/tolerances.py only; inputs are fresh random every run
(replay a failure with DLOPT_TEST_SEED).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from optim_op_helpers import (DEVICE_BACKENDS, DTYPES, SHAPE_NAMES, LowpErrors,
                              backend_state_cases, assert_fp32_close, assert_poison_intact,
                              assert_state_close_normwise,
                              dtype_id, embed, embed_strided, rand_grads, shapes_for, trace_scale)
from reference import rmsprop_float64
from tolerances import SR_BIT_AGREEMENT, SR_MAX_ULPS, spacing, tol

op = torch.ops.dlopt.rmsprop_step
KEYS = ("square_avg", "grad_avg", "momentum_buffer")


def new_state(params, state_dtype=None):
    sd = lambda p: state_dtype or p.dtype  # noqa: E731
    return SimpleNamespace(v=[torch.zeros_like(p, dtype=sd(p)) for p in params],
                           ga=[torch.zeros_like(p, dtype=sd(p)) for p in params],
                           buf=[torch.zeros_like(p, dtype=sd(p)) for p in params],
                           steps=[torch.zeros((), device=p.device) for p in params])


def run_op(params, grads_seq, backend, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
           momentum=0.0, centered=False, maximize=False, state_dtype=None, state=None,
           masters=None, sr_seed=None, grad_scale=None, found_inf=None,
           lr_dtype=torch.float64):
    """len(grads_seq) op calls on clones of `params`; returns every tensor it owns. The
    grad_avgs / momentum_buffers lists are passed only when in use (empty otherwise)."""
    params = [p.clone() for p in params]
    state = state or new_state(params, state_dtype)
    masters = [] if masters is None else [m.clone() for m in masters]
    lr_t = torch.tensor(lr, dtype=lr_dtype, device=params[0].device if params else "cpu")
    for grads in grads_seq:
        snapshot = [g.clone() for g in grads]
        op(params, grads, state.v, state.ga if centered else [],
           state.buf if momentum > 0 else [], masters, state.steps, lr_t, alpha, eps,
           weight_decay, momentum, centered, maximize, grad_scale, found_inf, sr_seed, backend)
        for g, s in zip(grads, snapshot):  # grads are read-only
            assert torch.equal(g, s)
    return SimpleNamespace(params=params, masters=masters, **vars(state))


def run_torch(params, grads_seq, *, init_state=None, **hp):
    """torch.optim.RMSprop (for-loop implementation) on clones of `params`."""
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    opt = torch.optim.RMSprop(ps, foreach=False, **hp)
    if init_state is not None:
        for p, st in zip(ps, init_state):
            opt.state[p] = {k: v.clone() for k, v in st.items()}
    for grads in grads_seq:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    return ps, opt


def check(ours, params0, grads_seq, hp):
    """fp32: ours ~ torch ~ float64 oracle (params and every state torch keeps);
    bf16/fp16: ours' error against the oracle at most LOWP_ERR_RATIO x torch's."""
    ref_ps, ref_opt = run_torch(params0, grads_seq, **hp)
    lowp = LowpErrors()
    for i, p0 in enumerate(params0):
        gi = [g[i] for g in grads_seq]
        trace = []
        oracle, ov, oga, obuf = rmsprop_float64(p0, gi, trace=trace, **hp)
        got, want = ours.params[i], ref_ps[i].detach()
        st = ref_opt.state[ref_ps[i]]
        assert got.dtype == p0.dtype and got.shape == p0.shape
        assert float(ours.steps[i]) == float(st["step"])
        if p0.dtype == torch.float32:
            assert_fp32_close(got, want)
            torch.testing.assert_close(got.double(), oracle, **tol(torch.float32))
            mine = {"square_avg": ours.v[i], "grad_avg": ours.ga[i], "momentum_buffer": ours.buf[i]}
            oracles = {"square_avg": ov, "grad_avg": oga, "momentum_buffer": obuf}
            for key in KEYS:
                if key in st:
                    assert_state_close_normwise(mine[key], st[key])
                    assert_state_close_normwise(mine[key].double(), oracles[key])
        else:
            scale = trace_scale(p0, trace)
            lowp.add(got, want, oracle, scale)
    lowp.check()


# ------------------------------------------------------------------------- accuracy
#
# eps: where g + weight_decay * p nearly cancels, g / (sqrt(v - ga**2) + eps) turns the
# fp32 rounding of g (~1e-9) into an error of up to ~1e-9 / eps in the momentum buffer,
# in torch as here. Tests that decay toward cancellation from zero states use eps 1e-3
# (torch's own tests pick such eps for the same reason), so fp32 comparisons are not
# at the mercy of one ill-conditioned element.


def _fp16_no_cancelling_decay(hp, dtype):
    """fp16 states with centered=True: where g + weight_decay * p nearly cancels, the
    stored square_avg underflows to 0 while grad_avg does not, so v - grad_avg**2 < 0
    and sqrt gives NaN in any fp32 arithmetic (torch's fp16 arithmetic happens to round
    that difference to -0). Keep those cases out of the fp16 comparison."""
    if dtype == torch.float16 and hp.get("centered"):
        hp["weight_decay"] = 0.0


@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_shapes_match_torch_and_oracle(device, backend, dtype, shape_name):
    params0 = [torch.randn(s, device=device).to(dtype) for s in shapes_for(shape_name, device, backend)]
    grads_seq = rand_grads(params0, 3)
    hp = dict(lr=1e-2, momentum=0.9, weight_decay=0.1, centered=True, eps=1e-3)
    _fp16_no_cancelling_decay(hp, dtype)
    check(run_op(params0, grads_seq, backend, **hp), params0, grads_seq, hp)


FLAGS = {
    "plain": dict(),
    "weight_decay": dict(weight_decay=0.1, alpha=0.9, lr_dtype=torch.float32),
    "momentum": dict(momentum=0.9),
    "centered": dict(centered=True, alpha=0.9),
    "all_maximize": dict(momentum=0.5, centered=True, weight_decay=0.2, maximize=True, alpha=0.8,
                         eps=1e-3, lr=3e-2, lr_dtype=torch.float32),
}


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("device,backend,dtype,state_dtype", backend_state_cases())
def test_flags_match_torch_and_oracle(device, backend, dtype, state_dtype, flags):
    hp = dict(FLAGS[flags])
    lr_dtype = hp.pop("lr_dtype", torch.float64)
    if dtype == torch.float16:
        # as torch's own optimizer tests do for fp16: eps 1e-8 is 0 in fp16
        hp["eps"] = 0.1
    _fp16_no_cancelling_decay(hp, dtype)
    params0 = [torch.randn(s, device=device).to(dtype) for s in [(4097,), (33, 7), ()]]
    grads_seq = rand_grads(params0, 4, scales=[1.0, 3.0, 0.3, 0.5])
    ours = run_op(params0, grads_seq, backend, state_dtype=state_dtype, lr_dtype=lr_dtype, **hp)
    assert all(s.dtype == (state_dtype or dtype) for s in ours.v)
    if lr_dtype == torch.float32:  # torch gets the lr value our kernel was given
        hp["lr"] = float(torch.tensor(hp.get("lr", 1e-2), dtype=torch.float32))
    hp.setdefault("lr", 1e-2)
    check(ours, params0, grads_seq, hp)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_resume_from_state(device, backend):
    """Random states and a step count of 7, as after loading a checkpoint."""
    params0 = [torch.randn(s, device=device) for s in [(1000,), (5, 3)]]
    init = [{"step": torch.tensor(7.0), "square_avg": torch.rand_like(p) + 0.5,
             "grad_avg": 0.1 * torch.randn_like(p), "momentum_buffer": torch.randn_like(p)}
            for p in params0]
    state = SimpleNamespace(v=[s["square_avg"].clone() for s in init],
                            ga=[s["grad_avg"].clone() for s in init],
                            buf=[s["momentum_buffer"].clone() for s in init],
                            steps=[s["step"].clone().to(device) for s in init])
    grads_seq = rand_grads(params0, 2)
    hp = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)
    ours = run_op(params0, grads_seq, backend, state=state, **hp)
    ref_ps, ref_opt = run_torch(params0, grads_seq, init_state=init, **hp)
    for i, p in enumerate(ref_ps):
        assert_fp32_close(ours.params[i], p.detach())
        st = ref_opt.state[p]
        for mine, key in ((ours.v, "square_avg"), (ours.ga, "grad_avg"),
                          (ours.buf, "momentum_buffer")):
            assert_state_close_normwise(mine[i], st[key])
        assert float(ours.steps[i]) == 9.0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_unused_lists_are_ignored(device, backend):
    """Not centered / no momentum: grad_avgs and momentum_buffers are neither read nor
    written, whether passed or empty."""
    params0 = [torch.randn(s, device=device) for s in [(100,), (3, 4)]]
    grads = rand_grads(params0, 1)[0]
    extra = [torch.randn_like(p) for p in params0]
    before = [t.clone() for t in extra]
    lr = torch.tensor(0.01, dtype=torch.float64, device=device)
    outs = []
    for lists in ((extra, extra), ([], [])):
        ps, v = [p.clone() for p in params0], [torch.zeros_like(p) for p in params0]
        steps = [torch.zeros((), device=device) for _ in params0]
        op(ps, grads, v, *lists, [], steps, lr, 0.99, 1e-8, 0.0, 0.0, False, False, None, None,
           None, backend)
        outs.append(ps + v)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    for a, b in zip(extra, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_lists(device, backend):
    op([], [], [], [], [], [], [], torch.tensor(1e-3, dtype=torch.float64), 0.99, 1e-8, 0.0, 0.0,
       False, False, None, None, None, backend)


# ------------------------------------------------------------------- GradScaler args


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_scale_unscales(device, backend):
    params0 = [torch.randn(s, device=device) for s in [(4097,), (7, 9)]]
    grads_seq = rand_grads(params0, 3)
    hp = dict(momentum=0.9, centered=True, weight_decay=0.1, eps=1e-3)
    plain = run_op(params0, grads_seq, backend, **hp)
    s = 2.0**12  # a power of two divides exactly: bit-identical to the unscaled step
    scaled = run_op(params0, [[g * s for g in gs] for gs in grads_seq], backend, **hp,
                    grad_scale=torch.tensor(s, device=device))
    for a, b in zip(plain.params + plain.v + plain.ga + plain.buf,
                    scaled.params + scaled.v + scaled.ga + scaled.buf):
        assert torch.equal(a, b)
    s = 1000.5
    scaled = run_op(params0, [[g * s for g in gs] for gs in grads_seq], backend, **hp,
                    grad_scale=torch.tensor(s, device=device))
    check(scaled, params0, grads_seq, dict(hp, lr=1e-2))


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_found_inf_skips_everything(device, backend, master):
    dtype = torch.bfloat16 if master else torch.float32
    params0 = [torch.randn(s, device=device).to(dtype) for s in [(4097,), (), (0,)]]
    masters = [p.float() + 1e-3 * torch.randn_like(p.float()) for p in params0] if master else None
    f32 = dict(dtype=torch.float32)
    state = SimpleNamespace(v=[torch.rand_like(p, **f32) + 0.1 for p in params0],
                            ga=[0.01 * torch.randn_like(p, **f32) for p in params0],
                            buf=[torch.randn_like(p, **f32) for p in params0],
                            steps=[torch.full((), 3.0, device=device) for _ in params0])
    before = {k: [t.clone() for t in v] for k, v in vars(state).items()}
    grads = rand_grads(params0, 1)
    hp = dict(momentum=0.9, centered=True, weight_decay=0.1, masters=masters)
    out = run_op(params0, grads, backend, state=state, found_inf=torch.tensor(1.0, device=device),
                 **hp)
    for a, b in zip(out.params + out.masters, params0 + (masters or [])):
        assert torch.equal(a, b)
    for k, ts in before.items():
        for a, b in zip(getattr(out, k), ts):
            assert torch.equal(a, b)
    clone = lambda: SimpleNamespace(**{k: [t.clone() for t in v] for k, v in before.items()})  # noqa: E731
    run_fi = run_op(params0, grads, backend, state=clone(),
                    found_inf=torch.tensor(0.0, device=device), **hp)
    run_no = run_op(params0, grads, backend, state=clone(), **hp)
    for a, b in zip(run_fi.params + run_fi.v + run_fi.buf + run_fi.steps,
                    run_no.params + run_no.v + run_no.buf + run_no.steps):
        assert torch.equal(a, b)
    assert float(run_no.steps[0]) == 4.0


# -------------------------------------------------------------------- poisoned memory


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_views_into_poisoned_buffers(device, backend, dtype):
    """Every tensor the op touches is a view into a NaN-filled buffer (one param a
    strided view): results equal a run on clean tensors, and no bit outside the views
    changes."""
    n = 4097
    p0 = [torch.randn(n, device=device).to(dtype), torch.randn(n, device=device).to(dtype)]
    grads_seq = rand_grads(p0, 2)
    hp = dict(momentum=0.9, centered=True, weight_decay=0.1, eps=0.1)
    clean = run_op(p0, grads_seq, backend, **hp)
    bufs, lists = [], {"p": [], "v": [], "ga": [], "buf": []}
    for i, t in enumerate(p0):
        for name in lists:
            src = t if name == "p" else torch.zeros_like(t)
            b, v = (embed_strided if (name == "p" and i == 1) else embed)(src)
            bufs.append((b, v, b.clone()))
            lists[name].append(v)
    steps = [torch.zeros((), device=device) for _ in p0]
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    for gs in grads_seq:
        row = []
        for g in gs:
            b, v = embed(g)
            bufs.append((b, v, b.clone()))
            row.append(v)
        op(lists["p"], row, lists["v"], lists["ga"], lists["buf"], [], steps, lr, 0.99, 0.1, 0.1,
           0.9, True, False, None, None, None, backend)
    for a, b in zip(lists["p"] + lists["v"] + lists["ga"] + lists["buf"],
                    clean.params + clean.v + clean.ga + clean.buf):
        assert torch.equal(a, b)
    assert_poison_intact(bufs)


# --------------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_master_weights(device, backend, dtype):
    """With fp32 masters the params are outputs only (NaN before the first step), equal
    to the master rounded to nearest after each step; masters follow torch's fp32
    RMSprop."""
    shapes = [(4097,), (13, 5), (), (0,)]
    masters0 = [torch.randn(s, device=device) for s in shapes]
    params = [torch.full(s, float("nan"), device=device, dtype=dtype) for s in shapes]
    state = new_state(masters0)
    masters = [m.clone() for m in masters0]
    grads_seq = rand_grads(params, 3)
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    for gs in grads_seq:
        op(params, gs, state.v, state.ga, state.buf, masters, state.steps, lr, 0.99, 1e-3, 0.1,
           0.9, True, False, None, None, None, backend)
        for p, m in zip(params, masters):
            assert torch.equal(p, m.to(dtype))
    ref_ps, ref_opt = run_torch(masters0, [[g.float() for g in gs] for gs in grads_seq],
                                lr=1e-2, momentum=0.9, centered=True, weight_decay=0.1, eps=1e-3)
    for i, p in enumerate(ref_ps):
        assert_fp32_close(masters[i], p.detach())
        assert_fp32_close(state.v[i], ref_opt.state[p]["square_avg"])
        assert_state_close_normwise(state.buf[i], ref_opt.state[p]["momentum_buffer"])


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_within_one_ulp_of_fp32_update(device, backend):
    shapes = [(4097,), (0,), (31, 3), ()]
    params0 = [torch.randn(s, device=device).to(torch.bfloat16) for s in shapes]
    init = [{"step": torch.tensor(5.0), "square_avg": torch.rand(s, device=device) + 0.1,
             "momentum_buffer": 0.01 * torch.randn(s, device=device)} for s in shapes]
    grads = rand_grads(params0, 1)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
    state = SimpleNamespace(v=[s["square_avg"].clone() for s in init], ga=[],
                            buf=[s["momentum_buffer"].clone() for s in init],
                            steps=[s["step"].clone().to(device) for s in init])
    out = run_op(params0, grads, backend, state=state, sr_seed=seed, lr=1e-3, momentum=0.9,
                 weight_decay=0.1)
    ref_ps, _ = run_torch([p.float() for p in params0], [[g.float() for g in grads[0]]],
                          init_state=init, lr=1e-3, momentum=0.9, weight_decay=0.1)
    rtol, atol = tol(torch.float32).values()
    for got, want in zip(out.params, ref_ps):
        want = want.detach().double()
        assert got.dtype == torch.bfloat16
        bound = SR_MAX_ULPS * spacing(torch.bfloat16, want) + atol + rtol * want.abs()
        assert ((got.double() - want).abs() <= bound).all()
    assert not torch.equal(out.v[0], out.v[0].bfloat16().float())


def _sr_pairs():
    bes = [b for d, b in DEVICE_BACKENDS if d == "cpu"]
    return [(a, b) for i, a in enumerate(bes) for b in bes[i + 1:]]


@pytest.mark.parametrize("backend_a,backend_b", _sr_pairs())
def test_sr_bits_agree_across_backends(backend_a, backend_b):
    shapes = [(4097,), (0,), (300, 7), (), (70001,)]
    params0 = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    v0 = [torch.rand(s) + 0.1 for s in shapes]
    grads = rand_grads(params0, 1)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)

    def go(be, sr):
        state = SimpleNamespace(v=[t.clone() for t in v0], ga=[], buf=[],
                                steps=[torch.full((), 4.0) for _ in shapes])
        out = run_op(params0, grads, be, state=state, sr_seed=seed if sr else None, lr=1e-3,
                     weight_decay=0.1)
        return torch.cat([p.reshape(-1) for p in out.params]).view(torch.int16)

    a, b = go(backend_a, True), go(backend_b, True)
    agree = float((a == b).double().mean())
    assert agree >= SR_BIT_AGREEMENT, f"{backend_a} vs {backend_b}: {agree:.4%} of bits agree"
    assert float((a != go(backend_a, False)).double().mean()) > 0.05  # SR really happened


# --------------------------------------------------------------------------- opcheck


def _opcheck_samples(device, backend):
    def lists(shapes, dtype, state_dtype, centered, momentum, master):
        ps = [torch.randn(s, device=device).to(dtype) for s in shapes]
        gs = [torch.randn(s, device=device).to(dtype) for s in shapes]
        vs = [torch.rand(s, device=device).to(state_dtype) + 0.5 for s in shapes]
        ga = [0.1 * torch.randn(s, device=device).to(state_dtype) for s in shapes] if centered else []
        bs = [torch.randn(s, device=device).to(state_dtype) for s in shapes] if momentum else []
        ms = [p.float() for p in ps] if master else []
        steps = [torch.full((), 2.0, device=device) for _ in shapes]
        return [ps, gs, vs, ga, bs, ms, steps]

    f64 = torch.tensor(1e-3, dtype=torch.float64, device=device)
    f32 = torch.tensor(1e-2, dtype=torch.float32, device=device)
    return {
        "fp32": (*lists([(65,), (3, 4)], torch.float32, torch.float32, False, False, False), f64,
                 0.99, 1e-8, 0.0, 0.0, False, False, None, None, None, backend),
        "bf16_master_centered_momentum_scaler": (
            *lists([(65,), ()], torch.bfloat16, torch.float32, True, True, True), f32, 0.9, 1e-8,
            0.1, 0.9, True, False, torch.tensor(4.0, device=device),
            torch.tensor(0.0, device=device), None, backend),
        "bf16_sr_maximize": (
            *lists([(65,), (2, 3)], torch.bfloat16, torch.float32, False, True, False), f64, 0.99,
            1e-8, 0.1, 0.5, False, True, None, None,
            torch.tensor(1234, dtype=torch.int64, device=device), backend),
        "fp16_states_fp16": (*lists([(65,)], torch.float16, torch.float16, True, False, False),
                             f64, 0.99, 1e-3, 0.0, 0.0, True, False, None, None, None, backend),
    }


@pytest.mark.parametrize("sample", ["fp32", "bf16_master_centered_momentum_scaler",
                                    "bf16_sr_maximize", "fp16_states_fp16"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend, sample):
    torch.library.opcheck(torch.ops.dlopt.rmsprop_step.default,
                          _opcheck_samples(device, backend)[sample])
