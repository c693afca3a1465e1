"""torch.ops.dlopt.lamb_step, per backend, against the float64 LAMB written from the
paper's equations (tests/reference.py LambFloat64): dtypes, odd shapes, every flag,
global grad-norm clipping, the trust ratio's edge cases, GradScaler arguments, master
weights, stochastic rounding, poisoned memory and torch.library.opcheck.

Tolerances come from tests/tolerances.py only; inputs are fresh random every run.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import device_backends
from reference import LambFloat64
from tolerances import (LAMB_LOWP_ULPS_PER_STEP, LAMB_SIGN_MARGIN, SR_BIT_AGREEMENT,
                        SR_MAX_ULPS, spacing, tol, ulp_error)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE_BACKENDS = device_backends()
op = torch.ops.dlopt.lamb_step
norm_op = torch.ops.dlopt.multi_tensor_norm


def _id(x):
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return None


def interpreted(device, backend):
    return backend == "triton" and device == "cpu"


def small_shapes(n: int) -> list[tuple]:
    dims = torch.randint(1, 65, (n, 2)).tolist()
    two_d = torch.rand(n).lt(0.5).tolist()
    shapes = [tuple(d) if t else (d[0],) for d, t in zip(dims, two_d)]
    shapes[n // 3] = ()
    shapes[2 * n // 3] = (0,)
    return shapes


SHAPES = {
    "1": lambda: [(1,)],
    "4097": lambda: [(4097,)],
    "chunk_edges": lambda: [(32768,), (65537,)],
    "many_small": lambda: small_shapes(120),
    "0dim": lambda: [()],
    "zero_size": lambda: [(0,), (3, 0, 2), (7,)],
}


def rand_grads(params, n_steps, scales=None):
    """Fresh grads per step. For fp16 params the magnitudes are kept >= 0.25 (times the
    step's scale): fp16 states hold (1 - beta2) * g^2, which underflows for small g (the
    same limit as torch's fp16 Adam; tests/ops/test_optim_adam.py does the same)."""
    out = []
    for k in range(n_steps):
        s = 1.0 if scales is None else scales[k % len(scales)]
        gs = []
        for p in params:
            g = torch.randn(p.shape, device=p.device)
            if p.dtype == torch.float16:
                g = torch.where(g < 0, -1.0, 1.0) * g.abs().clamp_min(0.25)
            gs.append((g * s).to(p.dtype))
        out.append(gs)
    return out


def new_state(params, state_dtype=None):
    sd = lambda p: state_dtype or p.dtype  # noqa: E731
    return SimpleNamespace(m=[torch.zeros_like(p, dtype=sd(p)) for p in params],
                           v=[torch.zeros_like(p, dtype=sd(p)) for p in params],
                           steps=[torch.zeros((), device=p.device) for p in params])


def run_op(params, grads_seq, backend, *, lr=1e-2, betas=(0.9, 0.999), eps=1e-6,
           weight_decay=0.01, bias_correction=True, max_grad_norm=0.0, state_dtype=None,
           masters=None, sr_seed=None, grad_scale=None, found_inf=None, state=None,
           lr_dtype=torch.float64):
    """len(grads_seq) op calls on clones of `params`; the global grad norm of each step
    comes from multi_tensor_norm on the same backend (on the grads as passed)."""
    params = [p.clone() for p in params]
    state = new_state(params, state_dtype) if state is None else state
    masters = [] if masters is None else [m.clone() for m in masters]
    dev = params[0].device
    lr_t = torch.tensor(lr, dtype=lr_dtype, device=dev)
    for grads in grads_seq:
        snapshot = [g.clone() for g in grads]
        gn = norm_op(grads, 2.0, backend)[1] if max_grad_norm > 0 else None
        op(params, grads, state.m, state.v, masters, state.steps, lr_t, betas[0], betas[1],
           weight_decay, eps, bias_correction, max_grad_norm, gn, grad_scale, found_inf,
           sr_seed, backend)
        for g, s in zip(grads, snapshot):  # grads are read-only
            assert torch.equal(g, s)
    return SimpleNamespace(params=params, masters=masters, **vars(state))


def oracle(params, grads_seq, *, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
           bias_correction=True, max_grad_norm=0.0, state=None, grad_scale=1.0):
    o = LambFloat64(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                    bias_correction=bias_correction, max_grad_norm=max_grad_norm or None,
                    state=state)
    for grads in grads_seq:
        o.step(grads, grad_scale)
    return o


def check(ours, params0, grads_seq, hp, **okw):
    o = oracle(params0, grads_seq, **hp, **okw)
    n = len(grads_seq)
    for i, p0 in enumerate(params0):
        got = ours.params[i]
        assert got.dtype == p0.dtype and got.shape == p0.shape
        start = okw["state"][i]["step"] if okw.get("state") else 0
        assert float(ours.steps[i]) == start + n
        if p0.dtype == torch.float32:
            torch.testing.assert_close(got.double(), o.params[i], **tol(torch.float32))
            torch.testing.assert_close(ours.m[i].double(), o.m[i], **tol(torch.float32))
            torch.testing.assert_close(ours.v[i].double(), o.v[i], **tol(torch.float32))
        elif p0.numel() == 1 and (ours.m[i].dtype != torch.float32
                                  or o.margin[i] < LAMB_SIGN_MARGIN):
            continue  # a sign the rounding decides (tolerances.py LAMB_SIGN_MARGIN)
        else:
            # each step rounds the param once (and the states, if stored low): the
            # error stays within LAMB_LOWP_ULPS_PER_STEP ulps per step
            pmax = float(p0.double().abs().max()) if p0.numel() else 0.0
            scale = p0.double().abs() + 2 * n * hp.get("lr", 1e-2) * pmax
            err = ulp_error(got, o.params[i], p0.dtype, scale)
            assert err <= LAMB_LOWP_ULPS_PER_STEP * n, f"params[{i}]: {err:.2f} ulp"
    return o


# ------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_shapes_match_oracle(device, backend, dtype, shape_name):
    shapes = SHAPES[shape_name]()
    n_steps = 3
    if shape_name == "many_small" and interpreted(device, backend):
        shapes, n_steps = small_shapes(15), 2  # ~1 ms per program instance interpreted
    params0 = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads_seq = rand_grads(params0, n_steps)
    hp = dict(lr=5e-2, weight_decay=0.01)
    # fp32 states (as with master weights or stochastic rounding); low-precision states
    # are test_flags_match_oracle's
    ours = run_op(params0, grads_seq, backend, state_dtype=torch.float32, **hp)
    check(ours, params0, grads_seq, hp)


FLAGS = {
    "default": dict(),
    "no_wd": dict(weight_decay=0.0),
    "no_bias_correction": dict(bias_correction=False, weight_decay=0.1),
    "clip_active": dict(max_grad_norm=1.0),  # grads' norm is ~100: clipped
    "clip_inactive": dict(max_grad_norm=1e6),
    "betas_eps_lr32": dict(betas=(0.8, 0.99), eps=1e-4, lr=3e-2, lr_dtype=torch.float32),
}
# (fp16 params are covered by the shape and master-weight tests)
STATE_CASES = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("dtype,state_dtype", STATE_CASES,
                         ids=[f"{_id(d)}-state_{_id(s) if s else 'same'}" for d, s in STATE_CASES])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_flags_match_oracle(device, backend, dtype, state_dtype, flags):
    hp = dict(FLAGS[flags])
    lr_dtype = hp.pop("lr_dtype", torch.float64)
    params0 = [torch.randn(s, device=device).to(dtype) for s in [(4097,), (33, 7), ()]]
    grads_seq = rand_grads(params0, 4, scales=[1.0, 3.0, 0.1, 0.5])
    ours = run_op(params0, grads_seq, backend, state_dtype=state_dtype, lr_dtype=lr_dtype, **hp)
    assert all(t.dtype == (state_dtype or dtype) for t in ours.m + ours.v)
    if lr_dtype == torch.float32:  # the oracle gets the lr value the kernel was given
        hp["lr"] = float(torch.tensor(hp["lr"], dtype=torch.float32))
    check(ours, params0, grads_seq, hp)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nonzero_initial_state(device, backend):
    """Resuming mid-training: random states and a step count of 7."""
    params0 = [torch.randn(s, device=device) for s in [(1000,), (5, 3)]]
    init = [{"step": 7, "exp_avg": torch.randn_like(p) * 0.1,
             "exp_avg_sq": torch.rand_like(p) * 0.01} for p in params0]
    state = SimpleNamespace(m=[s["exp_avg"].clone() for s in init],
                            v=[s["exp_avg_sq"].clone() for s in init],
                            steps=[torch.full((), 7.0, device=device) for _ in init])
    grads_seq = rand_grads(params0, 2)
    ours = run_op(params0, grads_seq, backend, state=state, max_grad_norm=5.0)
    check(ours, params0, grads_seq, dict(max_grad_norm=5.0), state=init)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_trust_ratio_edge_cases(device, backend):
    """A zero param (||p|| = 0) and a zero update (zero grads, no weight decay, zero
    states): the trust ratio is 1 and the oracle's p - lr * u follows."""
    params0 = [torch.zeros(300, device=device), torch.randn(50, device=device),
               torch.randn(7, device=device)]
    grads_seq = [[torch.randn(300, device=device), torch.zeros(50, device=device),
                  torch.randn(7, device=device)]]
    hp = dict(weight_decay=0.0)
    ours = run_op(params0, grads_seq, backend, **hp)
    check(ours, params0, grads_seq, hp)
    assert torch.equal(ours.params[1], params0[1])  # u = 0: unchanged
    # ||p|| = 0: trust 1, so the first step is lr * g / (|g| + eps), nearly lr everywhere
    big = grads_seq[0][0].abs() > 1e-2
    assert ((ours.params[0].abs() - 1e-2).abs()[big] < 1e-5).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_lists_and_missing_norm(device, backend):
    lr = torch.tensor(1e-3, dtype=torch.float64, device=device)
    op([], [], [], [], [], [], lr, 0.9, 0.999, 0.0, 1e-6, True, 0.0, None, None, None, None,
       backend)
    p = [torch.randn(5, device=device)]
    st = new_state(p)
    before = [t.clone() for t in p + st.m + st.steps]
    with pytest.raises((RuntimeError, ValueError), match="global_grad_norm"):
        op(p, [torch.randn(5, device=device)], st.m, st.v, [], st.steps, lr, 0.9, 0.999, 0.0,
           1e-6, True, 1.0, None, None, None, None, backend)
    for a, b in zip(p + st.m + st.steps, before):  # refused: nothing changed
        assert torch.equal(a, b)


def test_cpu_result_independent_of_thread_count():
    params0 = [torch.randn(s) for s in [(100_001,), (300, 200)]]
    grads_seq = rand_grads(params0, 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_op(params0, grads_seq, "cpu", max_grad_norm=1.0)
        torch.set_num_threads(max(2, threads))
        many = run_op(params0, grads_seq, "cpu", max_grad_norm=1.0)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one.params + one.m + one.v, many.params + many.m + many.v):
        assert torch.equal(a, b)


# ------------------------------------------------------------------- GradScaler args


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_scale_unscales(device, backend):
    params0 = [torch.randn(s, device=device) for s in [(4097,), (7, 9)]]
    grads_seq = rand_grads(params0, 3)
    hp = dict(max_grad_norm=2.0)
    plain = run_op(params0, grads_seq, backend, **hp)
    s = 2.0**12  # a power of two divides exactly: bit-identical to the unscaled step
    scaled = run_op(params0, [[g * s for g in gs] for gs in grads_seq], backend, **hp,
                    grad_scale=torch.tensor(s, device=device))
    for a, b in zip(plain.params + plain.m + plain.v, scaled.params + scaled.m + scaled.v):
        assert torch.equal(a, b)
    s = 1000.5
    scaled = run_op(params0, [[g * s for g in gs] for gs in grads_seq], backend, **hp,
                    grad_scale=torch.tensor(s, device=device))
    check(scaled, params0, [[g * s for g in gs] for gs in grads_seq], hp, grad_scale=s)


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_found_inf_skips_everything(device, backend, master):
    dtype = torch.bfloat16 if master else torch.float32
    params0 = [torch.randn(s, device=device).to(dtype) for s in [(4097,), (), (0,)]]
    masters = [p.float() + 1e-3 * torch.randn_like(p.float()) for p in params0] if master else None
    state = SimpleNamespace(m=[torch.randn_like(p, dtype=torch.float32) for p in params0],
                            v=[torch.rand_like(p, dtype=torch.float32) for p in params0],
                            steps=[torch.full((), 3.0, device=device) for _ in params0])
    before = [t.clone() for t in state.m + state.v + state.steps]
    grads = rand_grads(params0, 1)
    out = run_op(params0, grads, backend, masters=masters, state=state, max_grad_norm=1.0,
                 found_inf=torch.tensor(1.0, device=device))
    for a, b in zip(out.params, params0):
        assert torch.equal(a, b)
    for a, b in zip(out.m + out.v + out.steps, before):
        assert torch.equal(a, b)
    for a, b in zip(out.masters, masters or []):
        assert torch.equal(a, b)
    copy = SimpleNamespace(**{k: [t.clone() for t in v] for k, v in vars(state).items()})
    run_fi = run_op(params0, grads, backend, masters=masters, state=copy,
                    found_inf=torch.tensor(0.0, device=device))
    run_no = run_op(params0, grads, backend, masters=masters, state=state)
    for a, b in zip(run_fi.params + run_fi.m + run_fi.steps,
                    run_no.params + run_no.m + run_no.steps):
        assert torch.equal(a, b)
    assert float(run_no.steps[0]) == 4.0


# -------------------------------------------------------------------- poisoned memory


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_views_into_poisoned_buffers(device, backend, dtype):
    """Every tensor is a view into a NaN-filled buffer (one param strided): the op
    neither reads the NaNs nor writes outside the views."""
    n, pad = 4097, 17

    def embed(t):
        buf = torch.full((t.numel() + 2 * pad,), float("nan"), dtype=t.dtype, device=device)
        buf[pad:pad + t.numel()] = t.reshape(-1)
        return buf, buf[pad:pad + t.numel()].view(t.shape)

    def embed_strided(t):
        buf = torch.full((2 * t.numel() + 1,), float("nan"), dtype=t.dtype, device=device)
        view = buf[1::2]
        view.copy_(t)
        return buf, view

    p0 = [torch.randn(n, device=device).to(dtype), torch.randn(n, device=device).to(dtype)]
    grads_seq = rand_grads(p0, 2)
    clean = run_op(p0, grads_seq, backend, max_grad_norm=1.0)
    bufs, views = [], {}
    for name, ts in (("p", p0), ("m", [torch.zeros_like(p) for p in p0]),
                     ("v", [torch.zeros_like(p) for p in p0])):
        views[name] = []
        for i, t in enumerate(ts):
            b, v = (embed_strided if (name == "p" and i == 1) else embed)(t)
            bufs.append((b, v, b.clone()))
            views[name].append(v)
    poisoned = []
    for gs in grads_seq:
        row = []
        for g in gs:
            b, v = embed(g)
            bufs.append((b, v, b.clone()))
            row.append(v)
        poisoned.append(row)
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    steps = [torch.zeros((), device=device) for _ in p0]
    for gs in poisoned:
        gn = norm_op(gs, 2.0, backend)[1]
        op(views["p"], gs, views["m"], views["v"], [], steps, lr, 0.9, 0.999, 0.01, 1e-6, True,
           1.0, gn, None, None, None, backend)
    for a, b in zip(views["p"] + views["m"] + views["v"], clean.params + clean.m + clean.v):
        assert torch.equal(a, b)
    ibits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    for buf, view, orig in bufs:
        outside = torch.ones(buf.numel(), dtype=torch.bool, device=device)
        end = view.storage_offset() + view.stride(0) * (view.numel() - 1) + 1
        outside[view.storage_offset():end:view.stride(0)] = False
        bits = ibits[buf.dtype]
        assert torch.equal(buf.view(bits)[outside], orig.view(bits)[outside])


# --------------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_master_weights(device, backend, dtype):
    """With fp32 masters the params are outputs only (NaN before the first step): after
    each step param == master rounded; the masters follow the oracle like fp32 params."""
    shapes = [(4097,), (13, 5), (), (0,)]
    masters0 = [torch.randn(s, device=device) for s in shapes]
    params = [torch.full(s, float("nan"), device=device, dtype=dtype) for s in shapes]
    state = new_state(masters0)
    masters = [m.clone() for m in masters0]
    grads_seq = rand_grads(params, 3)
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    for gs in grads_seq:
        gn = norm_op(gs, 2.0, backend)[1]
        op(params, gs, state.m, state.v, masters, state.steps, lr, 0.9, 0.999, 0.01, 1e-6, True,
           1.0, gn, None, None, None, backend)
        for p, m in zip(params, masters):
            assert torch.equal(p, m.to(dtype))
    o = oracle(masters0, [[g.float() for g in gs] for gs in grads_seq], max_grad_norm=1.0)
    for i in range(len(shapes)):
        torch.testing.assert_close(masters[i].double(), o.params[i], **tol(torch.float32))


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_within_one_ulp_of_fp32_update(device, backend):
    shapes = [(4097,), (0,), (31, 3), ()]
    params0 = [torch.randn(s, device=device).to(torch.bfloat16) for s in shapes]
    grads = rand_grads(params0, 1)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
    out = run_op(params0, grads, backend, state_dtype=torch.float32, sr_seed=seed)
    want = run_op([p.float() for p in params0], [[g.float() for g in grads[0]]], backend)
    rtol, atol = tol(torch.float32).values()
    for got, w in zip(out.params, want.params):
        w = w.double()
        assert got.dtype == torch.bfloat16
        bound = SR_MAX_ULPS * spacing(torch.bfloat16, w) + atol + rtol * w.abs()
        assert ((got.double() - w).abs() <= bound).all()
    # not round-to-nearest: some elements went to the farther neighbour
    near = torch.cat([w.bfloat16().reshape(-1) for w in want.params])
    assert not torch.equal(torch.cat([p.reshape(-1) for p in out.params]), near)


def _pairs():
    bes = [b for d, b in DEVICE_BACKENDS if d == "cpu"]
    return [(a, b) for i, a in enumerate(bes) for b in bes[i + 1:]]


@pytest.mark.parametrize("backend_a,backend_b", _pairs())
def test_backends_agree_sr_bits(backend_a, backend_b):
    shapes = [(4097,), (0,), (300, 7), ()]
    params0 = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    grads = rand_grads(params0, 1)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    outs = [run_op(params0, grads, be, state_dtype=torch.float32, sr_seed=seed,
                   max_grad_norm=1.0) for be in (backend_a, backend_b)]
    a = torch.cat([p.reshape(-1) for p in outs[0].params]).view(torch.int16)
    b = torch.cat([p.reshape(-1) for p in outs[1].params]).view(torch.int16)
    agree = float((a == b).double().mean())
    assert agree >= SR_BIT_AGREEMENT, f"{backend_a} vs {backend_b}: {agree:.4%} of bits agree"


# --------------------------------------------------------------------------- opcheck


def _opcheck_samples(device, backend):
    def lists(shapes, dtype, state_dtype, master):
        ps = [torch.randn(s, device=device).to(dtype) for s in shapes]
        gs = [torch.randn(s, device=device).to(dtype) for s in shapes]
        ms = [torch.randn(s, device=device).to(state_dtype) * 0.1 for s in shapes]
        vs = [torch.rand(s, device=device).to(state_dtype) * 0.01 for s in shapes]
        masters = [p.float() for p in ps] if master else []
        steps = [torch.full((), 2.0, device=device) for _ in shapes]
        return [ps, gs, ms, vs, masters, steps]

    f64 = torch.tensor(1e-3, dtype=torch.float64, device=device)
    f32 = torch.tensor(1e-2, dtype=torch.float32, device=device)
    one = torch.tensor(1.0, device=device)
    return {
        "fp32": (*lists([(65,), (3, 4)], torch.float32, torch.float32, False), f64, 0.9, 0.999,
                 0.01, 1e-6, True, 0.0, None, None, None, None, backend),
        "bf16_master_clip_scaler": (
            *lists([(65,), ()], torch.bfloat16, torch.float32, True), f32, 0.9, 0.99, 0.1, 1e-6,
            False, 1.0, 3 * one, 4 * one, 0 * one, None, backend),
        "bf16_sr": (*lists([(65,), (2, 3)], torch.bfloat16, torch.float32, False), f64, 0.9,
                    0.999, 0.0, 1e-6, True, 0.0, None, None, None,
                    torch.tensor(1234, dtype=torch.int64, device=device), backend),
        "fp16_states_fp16": (*lists([(65,)], torch.float16, torch.float16, False), f64, 0.9,
                             0.999, 0.01, 1e-4, True, 0.0, None, None, None, None, backend),
    }


@pytest.mark.parametrize("sample", ["fp32", "bf16_master_clip_scaler", "bf16_sr",
                                    "fp16_states_fp16"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend, sample):
    torch.library.opcheck(torch.ops.dlopt.lamb_step.default,
                          _opcheck_samples(device, backend)[sample])
