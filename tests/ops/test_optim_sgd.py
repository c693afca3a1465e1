"""torch.ops.dlopt.sgd_step, per backend: against torch.optim.SGD (same dtype) and the
float64 oracle (tests/reference.py), over dtypes, odd shapes and every flag; the first
step of a momentum buffer (new_buffers), master weights, stochastic rounding, GradScaler
arguments, poisoned memory around the tensors it writes, and torch.library.opcheck.

Tolerances come from tests/tolerances.py only; inputs are fresh random every run
(replay a failure with DLOPT_TEST_SEED).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from optim_op_helpers import (DEVICE_BACKENDS, DTYPES, SHAPE_NAMES, LowpErrors,
                              backend_state_cases, assert_fp32_close, assert_poison_intact,
                              dtype_id, embed, embed_strided, rand_grads, shapes_for, trace_scale)
from reference import sgd_float64
from tolerances import SR_BIT_AGREEMENT, SR_MAX_ULPS, spacing, tol

op = torch.ops.dlopt.sgd_step


def run_op(params, grads_seq, backend, *, lr=1e-2, momentum=0.0, dampening=0.0,
           weight_decay=0.0, nesterov=False, maximize=False, state_dtype=None, bufs=None,
           masters=None, sr_seed=None, grad_scale=None, found_inf=None,
           lr_dtype=torch.float64):
    """len(grads_seq) op calls on clones of `params`, as the optimizer makes them: the
    first call marks buffers created for it as new (unless `bufs` are given)."""
    params = [p.clone() for p in params]
    new = bufs is None
    if bufs is None:
        sd = lambda p: state_dtype or p.dtype  # noqa: E731
        # NaN: a new buffer must be written, never read
        bufs = [torch.full_like(p, float("nan"), dtype=sd(p)) for p in params]
    masters = [] if masters is None else [m.clone() for m in masters]
    lr_t = torch.tensor(lr, dtype=lr_dtype, device=params[0].device if params else "cpu")
    for k, grads in enumerate(grads_seq):
        snapshot = [g.clone() for g in grads]
        flags = [True] * len(params) if (new and k == 0 and momentum) else []
        op(params, grads, bufs if momentum else [], masters, lr_t, weight_decay, momentum,
           dampening, nesterov, maximize, flags, grad_scale, found_inf, sr_seed, backend)
        for g, s in zip(grads, snapshot):  # grads are read-only
            assert torch.equal(g, s)
    return SimpleNamespace(params=params, bufs=bufs, masters=masters)


def run_torch(params, grads_seq, *, init_bufs=None, **hp):
    """torch.optim.SGD (for-loop implementation) on clones of `params`."""
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    opt = torch.optim.SGD(ps, foreach=False, **hp)
    if init_bufs is not None:
        for p, b in zip(ps, init_bufs):
            opt.state[p]["momentum_buffer"] = b.clone()
    for grads in grads_seq:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    return ps, opt


def check(ours, params0, grads_seq, hp, init_bufs=None):
    """fp32: ours ~ torch ~ float64 oracle (params and buffers); bf16/fp16: ours' error
    against the oracle at most LOWP_ERR_RATIO x torch's."""
    ref_ps, ref_opt = run_torch(params0, grads_seq, init_bufs=init_bufs, **hp)
    lowp = LowpErrors()
    for i, p0 in enumerate(params0):
        gi = [g[i] for g in grads_seq]
        b0 = None if init_bufs is None else init_bufs[i]
        trace = []
        oracle, obuf = sgd_float64(p0, gi, buf=b0, trace=trace, **hp)
        got, want = ours.params[i], ref_ps[i].detach()
        assert got.dtype == p0.dtype and got.shape == p0.shape
        if p0.dtype == torch.float32:
            assert_fp32_close(got, want)
            torch.testing.assert_close(got.double(), oracle, **tol(torch.float32))
            if hp.get("momentum"):
                assert_fp32_close(ours.bufs[i], ref_opt.state[ref_ps[i]]["momentum_buffer"])
                torch.testing.assert_close(ours.bufs[i].double(), obuf, **tol(torch.float32))
        else:
            scale = trace_scale(p0, trace)
            lowp.add(got, want, oracle, scale)
    lowp.check()


# ------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_shapes_match_torch_and_oracle(device, backend, dtype, shape_name):
    params0 = [torch.randn(s, device=device).to(dtype) for s in shapes_for(shape_name, device, backend)]
    grads_seq = rand_grads(params0, 3)
    hp = dict(lr=1e-2, momentum=0.9, weight_decay=0.1)
    check(run_op(params0, grads_seq, backend, **hp), params0, grads_seq, hp)


FLAGS = {
    "plain": dict(),
    "weight_decay": dict(weight_decay=0.1, lr_dtype=torch.float32),
    "momentum": dict(momentum=0.9),
    "dampening_maximize": dict(momentum=0.8, dampening=0.3, maximize=True),
    "nesterov_wd": dict(momentum=0.9, nesterov=True, weight_decay=0.05, lr=3e-2),
    "all_maximize": dict(momentum=0.5, nesterov=True, weight_decay=0.2, maximize=True,
                         lr=1e-1, lr_dtype=torch.float32),
}


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("device,backend,dtype,state_dtype", backend_state_cases())
def test_flags_match_torch_and_oracle(device, backend, dtype, state_dtype, flags):
    hp = dict(FLAGS[flags])
    lr_dtype = hp.pop("lr_dtype", torch.float64)
    params0 = [torch.randn(s, device=device).to(dtype) for s in [(4097,), (33, 7), ()]]
    grads_seq = rand_grads(params0, 4, scales=[1.0, 3.0, 0.1, 0.5])
    ours = run_op(params0, grads_seq, backend, state_dtype=state_dtype, lr_dtype=lr_dtype, **hp)
    if hp.get("momentum"):
        assert all(b.dtype == (state_dtype or dtype) for b in ours.bufs)
    if lr_dtype == torch.float32:  # torch gets the lr value our kernel was given
        hp["lr"] = float(torch.tensor(hp.get("lr", 1e-2), dtype=torch.float32))
    hp.setdefault("lr", 1e-2)
    check(ours, params0, grads_seq, hp)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_new_and_existing_buffers_in_one_call(device, backend):
    """Buffers with history are read; new ones (a param's first step, e.g. one that got
    its first grad late) are written with the grad, whatever they held (NaN here)."""
    params0 = [torch.randn(s, device=device) for s in [(1000,), (5, 3), (7,)]]
    old = [0.3 * torch.randn_like(p) for p in params0]
    bufs = [old[0].clone(), torch.full_like(params0[1], float("nan")), old[2].clone()]
    grads = rand_grads(params0, 1)[0]
    hp = dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01)
    ps = [p.clone() for p in params0]
    op(ps, grads, bufs, [], torch.tensor(1e-2, dtype=torch.float64, device=device), 0.01, 0.9,
       0.1, False, False, [False, True, False], None, None, None, backend)
    for i in range(3):
        want, wbuf = sgd_float64(params0[i], [grads[i]], buf=None if i == 1 else old[i], **hp)
        torch.testing.assert_close(ps[i].double(), want, **tol(torch.float32))
        torch.testing.assert_close(bufs[i].double(), wbuf, **tol(torch.float32))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_momentum_zero_ignores_buffers(device, backend):
    """momentum == 0: the buffer list is not read or written (it may be empty)."""
    params0 = [torch.randn(s, device=device) for s in [(100,), (3, 4)]]
    grads = rand_grads(params0, 1)[0]
    bufs = [torch.randn_like(p) for p in params0]
    before = [b.clone() for b in bufs]
    lr = torch.tensor(0.1, dtype=torch.float64, device=device)
    a, b = [p.clone() for p in params0], [p.clone() for p in params0]
    op(a, grads, bufs, [], lr, 0.1, 0.0, 0.0, False, False, [True, True], None, None, None, backend)
    op(b, grads, [], [], lr, 0.1, 0.0, 0.0, False, False, [], None, None, None, backend)
    for x, y, buf, orig in zip(a, b, bufs, before):
        assert torch.equal(x, y) and torch.equal(buf, orig)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_lists(device, backend):
    op([], [], [], [], torch.tensor(1e-3, dtype=torch.float64), 0.0, 0.9, 0.0, False, False, [],
       None, None, None, backend)


# ------------------------------------------------------------------- GradScaler args


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_scale_unscales(device, backend):
    params0 = [torch.randn(s, device=device) for s in [(4097,), (7, 9)]]
    grads_seq = rand_grads(params0, 3)
    hp = dict(momentum=0.9, weight_decay=0.1, nesterov=True)
    plain = run_op(params0, grads_seq, backend, **hp)
    s = 2.0**12  # a power of two divides exactly: bit-identical to the unscaled step
    scaled = run_op(params0, [[g * s for g in gs] for gs in grads_seq], backend, **hp,
                    grad_scale=torch.tensor(s, device=device))
    for a, b in zip(plain.params + plain.bufs, scaled.params + scaled.bufs):
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
    bufs = [torch.randn_like(p, dtype=torch.float32) for p in params0]
    before = [b.clone() for b in bufs]
    grads = rand_grads(params0, 1)
    out = run_op(params0, grads, backend, momentum=0.9, weight_decay=0.1, masters=masters,
                 bufs=bufs, found_inf=torch.tensor(1.0, device=device))
    for a, b in zip(out.params + out.bufs + out.masters, params0 + before + (masters or [])):
        assert torch.equal(a, b)
    # found_inf == 0 is a normal step
    run_fi = run_op(params0, grads, backend, momentum=0.9, weight_decay=0.1, masters=masters,
                    bufs=[b.clone() for b in before], found_inf=torch.tensor(0.0, device=device))
    run_no = run_op(params0, grads, backend, momentum=0.9, weight_decay=0.1, masters=masters,
                    bufs=[b.clone() for b in before])
    for a, b in zip(run_fi.params + run_fi.bufs, run_no.params + run_no.bufs):
        assert torch.equal(a, b)
    assert not torch.equal(run_no.params[0], params0[0])


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
    hp = dict(momentum=0.9, weight_decay=0.1, nesterov=True)
    clean = run_op(p0, grads_seq, backend, **hp)
    bufs, views = [], {"p": [], "b": []}
    for i, t in enumerate(p0):
        b, v = (embed_strided if i == 1 else embed)(t)
        bufs.append((b, v, b.clone()))
        views["p"].append(v)
        b, v = embed(torch.zeros_like(t))
        bufs.append((b, v, b.clone()))
        views["b"].append(v)
    pgrads = []
    for gs in grads_seq:
        row = []
        for g in gs:
            b, v = embed(g)
            bufs.append((b, v, b.clone()))
            row.append(v)
        pgrads.append(row)
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    for k, gs in enumerate(pgrads):
        op(views["p"], gs, views["b"], [], lr, 0.1, 0.9, 0.0, True, False,
           [True, True] if k == 0 else [], None, None, None, backend)
    for a, b in zip(views["p"] + views["b"], clean.params + clean.bufs):
        assert torch.equal(a, b)
    assert_poison_intact(bufs)


# --------------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_master_weights(device, backend, dtype):
    """With fp32 masters the params are outputs only (NaN before the first step), equal
    to the master rounded to nearest after each step; masters follow torch's fp32 SGD."""
    shapes = [(4097,), (13, 5), (), (0,)]
    masters0 = [torch.randn(s, device=device) for s in shapes]
    params = [torch.full(s, float("nan"), device=device, dtype=dtype) for s in shapes]
    bufs = [torch.zeros_like(m) for m in masters0]
    masters = [m.clone() for m in masters0]
    grads_seq = rand_grads(params, 3)
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    for k, gs in enumerate(grads_seq):
        op(params, gs, bufs, masters, lr, 0.1, 0.9, 0.0, True, False,
           [True] * len(shapes) if k == 0 else [], None, None, None, backend)
        for p, m in zip(params, masters):
            assert torch.equal(p, m.to(dtype))
    ref_ps, ref_opt = run_torch(masters0, [[g.float() for g in gs] for gs in grads_seq],
                                lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True)
    for i, p in enumerate(ref_ps):
        assert_fp32_close(masters[i], p.detach())
        assert_fp32_close(bufs[i], ref_opt.state[p]["momentum_buffer"])


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_within_one_ulp_of_fp32_update(device, backend):
    shapes = [(4097,), (0,), (31, 3), ()]
    params0 = [torch.randn(s, device=device).to(torch.bfloat16) for s in shapes]
    bufs = [0.1 * torch.randn(s, device=device) for s in shapes]
    grads = rand_grads(params0, 1)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
    out = run_op(params0, grads, backend, bufs=[b.clone() for b in bufs], sr_seed=seed, lr=1e-3,
                 momentum=0.9, weight_decay=0.1)
    ref_ps, _ = run_torch([p.float() for p in params0], [[g.float() for g in grads[0]]],
                          init_bufs=bufs, lr=1e-3, momentum=0.9, weight_decay=0.1)
    rtol, atol = tol(torch.float32).values()
    for got, want in zip(out.params, ref_ps):
        want = want.detach().double()
        assert got.dtype == torch.bfloat16
        bound = SR_MAX_ULPS * spacing(torch.bfloat16, want) + atol + rtol * want.abs()
        assert ((got.double() - want).abs() <= bound).all()
    # the fp32 buffers are exact fp32 updates, not rounded to bf16
    assert not torch.equal(out.bufs[0], out.bufs[0].bfloat16().float())


def _sr_pairs():
    bes = [b for d, b in DEVICE_BACKENDS if d == "cpu"]
    return [(a, b) for i, a in enumerate(bes) for b in bes[i + 1:]]


@pytest.mark.parametrize("backend_a,backend_b", _sr_pairs())
def test_sr_bits_agree_across_backends(backend_a, backend_b):
    shapes = [(4097,), (0,), (300, 7), (), (70001,)]
    params0 = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    bufs = [0.1 * torch.randn(s) for s in shapes]
    grads = rand_grads(params0, 1)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    outs = [run_op(params0, grads, be, bufs=[b.clone() for b in bufs], sr_seed=seed,
                   momentum=0.9, weight_decay=0.1, lr=1e-3) for be in (backend_a, backend_b)]
    a = torch.cat([p.reshape(-1) for p in outs[0].params]).view(torch.int16)
    b = torch.cat([p.reshape(-1) for p in outs[1].params]).view(torch.int16)
    agree = float((a == b).double().mean())
    assert agree >= SR_BIT_AGREEMENT, f"{backend_a} vs {backend_b}: {agree:.4%} of bits agree"
    # and stochastic rounding really happened: not all elements are round-to-nearest
    nearest = run_op(params0, grads, backend_a, bufs=[b.clone() for b in bufs], momentum=0.9,
                     weight_decay=0.1, lr=1e-3)
    c = torch.cat([p.reshape(-1) for p in nearest.params]).view(torch.int16)
    assert float((a != c).double().mean()) > 0.05


# --------------------------------------------------------------------------- opcheck


def _opcheck_samples(device, backend):
    def lists(shapes, dtype, state_dtype, master):
        ps = [torch.randn(s, device=device).to(dtype) for s in shapes]
        gs = [torch.randn(s, device=device).to(dtype) for s in shapes]
        bs = [torch.randn(s, device=device).to(state_dtype) * 0.1 for s in shapes]
        ms = [p.float() for p in ps] if master else []
        return [ps, gs, bs, ms]

    f64 = torch.tensor(1e-3, dtype=torch.float64, device=device)
    f32 = torch.tensor(1e-2, dtype=torch.float32, device=device)
    return {
        "fp32_plain": (*lists([(65,), (3, 4)], torch.float32, torch.float32, False), f64, 0.0,
                       0.0, 0.0, False, False, [], None, None, None, backend),
        "fp32_momentum_new": (*lists([(65,), (3, 4)], torch.float32, torch.float32, False), f64,
                              0.1, 0.9, 0.1, False, False, [True, False], None, None, None,
                              backend),
        "bf16_master_nesterov_scaler": (
            *lists([(65,), ()], torch.bfloat16, torch.float32, True), f32, 0.1, 0.9, 0.0, True,
            False, [], torch.tensor(4.0, device=device), torch.tensor(0.0, device=device), None,
            backend),
        "bf16_sr_maximize": (
            *lists([(65,), (2, 3)], torch.bfloat16, torch.float32, False), f64, 0.1, 0.9, 0.0,
            False, True, [], None, None, torch.tensor(1234, dtype=torch.int64, device=device),
            backend),
        "fp16_states_fp16": (*lists([(65,)], torch.float16, torch.float16, False), f64, 0.0, 0.5,
                             0.0, False, False, [], None, None, None, backend),
    }


@pytest.mark.parametrize("sample", ["fp32_plain", "fp32_momentum_new",
                                    "bf16_master_nesterov_scaler", "bf16_sr_maximize",
                                    "fp16_states_fp16"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend, sample):
    torch.library.opcheck(torch.ops.dlopt.sgd_step.default, _opcheck_samples(device, backend)[sample])
