"""torch.ops.dlopt.adagrad_step, per backend: against torch.optim.Adagrad (same dtype)
and the float64 oracle (tests/reference.py), over dtypes, odd shapes and every flag;
resuming from a step count (lr decay), master weights, stochastic rounding, GradScaler
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
from reference import adagrad_float64
from tolerances import SR_BIT_AGREEMENT, SR_MAX_ULPS, spacing, tol

op = torch.ops.dlopt.adagrad_step


def new_state(params, state_dtype=None, init=0.0, step=0.0):
    sd = lambda p: state_dtype or p.dtype  # noqa: E731
    return SimpleNamespace(sums=[torch.full_like(p, init, dtype=sd(p)) for p in params],
                           steps=[torch.full((), step, device=p.device) for p in params])


def run_op(params, grads_seq, backend, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
           initial_accumulator_value=0.0, eps=1e-10, maximize=False, state_dtype=None,
           state=None, masters=None, sr_seed=None, grad_scale=None, found_inf=None,
           lr_dtype=torch.float64):
    """len(grads_seq) op calls on clones of `params`; returns every tensor it owns."""
    params = [p.clone() for p in params]
    state = state or new_state(params, state_dtype, initial_accumulator_value)
    masters = [] if masters is None else [m.clone() for m in masters]
    lr_t = torch.tensor(lr, dtype=lr_dtype, device=params[0].device if params else "cpu")
    for grads in grads_seq:
        snapshot = [g.clone() for g in grads]
        op(params, grads, state.sums, masters, state.steps, lr_t, lr_decay, weight_decay, eps,
           maximize, grad_scale, found_inf, sr_seed, backend)
        for g, s in zip(grads, snapshot):  # grads are read-only
            assert torch.equal(g, s)
    return SimpleNamespace(params=params, masters=masters, **vars(state))


def run_torch(params, grads_seq, *, init_state=None, **hp):
    """torch.optim.Adagrad (for-loop implementation) on clones of `params`."""
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    opt = torch.optim.Adagrad(ps, foreach=False, **hp)
    if init_state is not None:
        for p, st in zip(ps, init_state):
            opt.state[p] = {k: v.clone() for k, v in st.items()}
    for grads in grads_seq:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    return ps, opt


def check(ours, params0, grads_seq, hp, init_state=None):
    """fp32: ours ~ torch ~ float64 oracle (params and sums); bf16/fp16: ours' error
    against the oracle at most LOWP_ERR_RATIO x torch's."""
    ref_ps, ref_opt = run_torch(params0, grads_seq, init_state=init_state, **hp)
    lowp = LowpErrors()
    for i, p0 in enumerate(params0):
        gi = [g[i] for g in grads_seq]
        st0 = dict(state_sum=init_state[i]["sum"], step=int(init_state[i]["step"])) \
            if init_state else {}
        trace = []
        oracle, osum = adagrad_float64(p0, gi, trace=trace, **hp, **st0)
        got, want = ours.params[i], ref_ps[i].detach()
        assert got.dtype == p0.dtype and got.shape == p0.shape
        assert float(ours.steps[i]) == float(ref_opt.state[ref_ps[i]]["step"])
        if p0.dtype == torch.float32:
            assert_fp32_close(got, want)
            torch.testing.assert_close(got.double(), oracle, **tol(torch.float32))
            assert_fp32_close(ours.sums[i], ref_opt.state[ref_ps[i]]["sum"])
            torch.testing.assert_close(ours.sums[i].double(), osum, **tol(torch.float32))
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
    hp = dict(lr=1e-2, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.1)
    check(run_op(params0, grads_seq, backend, **hp), params0, grads_seq, hp)


FLAGS = {
    "plain": dict(),
    "lr_decay_wd": dict(lr=0.1, lr_decay=0.5, weight_decay=0.1, lr_dtype=torch.float32),
    "init_acc_eps": dict(initial_accumulator_value=0.5, eps=1e-4),
    "all_maximize": dict(lr=0.05, lr_decay=0.2, weight_decay=0.2, initial_accumulator_value=0.1,
                         eps=1e-6, maximize=True, lr_dtype=torch.float32),
}


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("device,backend,dtype,state_dtype", backend_state_cases())
def test_flags_match_torch_and_oracle(device, backend, dtype, state_dtype, flags):
    hp = dict(FLAGS[flags])
    lr_dtype = hp.pop("lr_dtype", torch.float64)
    if dtype == torch.float16:
        # as torch's own optimizer tests do for fp16: eps 1e-10 is 0 in fp16
        hp["eps"] = max(hp.get("eps", 1e-10), 1e-3)
    params0 = [torch.randn(s, device=device).to(dtype) for s in [(4097,), (33, 7), ()]]
    grads_seq = rand_grads(params0, 4, scales=[1.0, 3.0, 0.1, 0.5])
    ours = run_op(params0, grads_seq, backend, state_dtype=state_dtype, lr_dtype=lr_dtype, **hp)
    assert all(s.dtype == (state_dtype or dtype) for s in ours.sums)
    if lr_dtype == torch.float32:  # torch gets the lr value our kernel was given
        hp["lr"] = float(torch.tensor(hp.get("lr", 1e-2), dtype=torch.float32))
    hp.setdefault("lr", 1e-2)
    check(ours, params0, grads_seq, hp)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_resume_from_step(device, backend):
    """Each tensor's own step drives its lr decay: resume two tensors at steps 7 and 2
    with random sums, as after loading a checkpoint."""
    params0 = [torch.randn(s, device=device) for s in [(1000,), (5, 3)]]
    init = [{"step": torch.tensor(float(s)), "sum": torch.rand_like(p)}
            for p, s in zip(params0, (7, 2))]
    state = SimpleNamespace(sums=[s["sum"].clone() for s in init],
                            steps=[s["step"].clone().to(device) for s in init])
    grads_seq = rand_grads(params0, 2)
    hp = dict(lr=0.1, lr_decay=0.3, weight_decay=0.01)
    ours = run_op(params0, grads_seq, backend, state=state, **hp)
    check(ours, params0, grads_seq, hp, init_state=init)
    assert [float(s) for s in ours.steps] == [9.0, 4.0]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_lists(device, backend):
    op([], [], [], [], [], torch.tensor(1e-3, dtype=torch.float64), 0.0, 0.0, 1e-10, False, None,
       None, None, backend)


# ------------------------------------------------------------------- GradScaler args


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_scale_unscales(device, backend):
    params0 = [torch.randn(s, device=device) for s in [(4097,), (7, 9)]]
    grads_seq = rand_grads(params0, 3)
    hp = dict(lr_decay=0.1, weight_decay=0.1)
    plain = run_op(params0, grads_seq, backend, **hp)
    s = 2.0**12  # a power of two divides exactly: bit-identical to the unscaled step
    scaled = run_op(params0, [[g * s for g in gs] for gs in grads_seq], backend, **hp,
                    grad_scale=torch.tensor(s, device=device))
    for a, b in zip(plain.params + plain.sums, scaled.params + scaled.sums):
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
    state = SimpleNamespace(sums=[torch.rand_like(p, dtype=torch.float32) for p in params0],
                            steps=[torch.full((), 3.0, device=device) for _ in params0])
    before = [t.clone() for t in state.sums + state.steps]
    grads = rand_grads(params0, 1)
    out = run_op(params0, grads, backend, weight_decay=0.1, masters=masters, state=state,
                 found_inf=torch.tensor(1.0, device=device))
    for a, b in zip(out.params + out.sums + out.steps + out.masters,
                    params0 + before + (masters or [])):
        assert torch.equal(a, b)
    clone = lambda: SimpleNamespace(sums=[t.clone() for t in before[:3]],  # noqa: E731
                                    steps=[t.clone() for t in before[3:]])
    run_fi = run_op(params0, grads, backend, weight_decay=0.1, masters=masters, state=clone(),
                    found_inf=torch.tensor(0.0, device=device))
    run_no = run_op(params0, grads, backend, weight_decay=0.1, masters=masters, state=clone())
    for a, b in zip(run_fi.params + run_fi.sums + run_fi.steps,
                    run_no.params + run_no.sums + run_no.steps):
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
    hp = dict(lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.1, eps=1e-3)
    clean = run_op(p0, grads_seq, backend, **hp)
    bufs, ps, sums = [], [], []
    for i, t in enumerate(p0):
        b, v = (embed_strided if i == 1 else embed)(t)
        bufs.append((b, v, b.clone()))
        ps.append(v)
        b, v = embed(torch.full_like(t, 0.1))
        bufs.append((b, v, b.clone()))
        sums.append(v)
    steps = [torch.zeros((), device=device) for _ in p0]
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    for gs in grads_seq:
        row = []
        for g in gs:
            b, v = embed(g)
            bufs.append((b, v, b.clone()))
            row.append(v)
        op(ps, row, sums, [], steps, lr, 0.1, 0.1, 1e-3, False, None, None, None, backend)
    for a, b in zip(ps + sums, clean.params + clean.sums):
        assert torch.equal(a, b)
    assert_poison_intact(bufs)


# --------------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_master_weights(device, backend, dtype):
    """With fp32 masters the params are outputs only (NaN before the first step), equal
    to the master rounded to nearest after each step; masters follow torch's fp32
    Adagrad."""
    shapes = [(4097,), (13, 5), (), (0,)]
    masters0 = [torch.randn(s, device=device) for s in shapes]
    params = [torch.full(s, float("nan"), device=device, dtype=dtype) for s in shapes]
    state = new_state(masters0, init=0.1)
    masters = [m.clone() for m in masters0]
    grads_seq = rand_grads(params, 3)
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    for gs in grads_seq:
        op(params, gs, state.sums, masters, state.steps, lr, 0.1, 0.1, 1e-10, False, None, None,
           None, backend)
        for p, m in zip(params, masters):
            assert torch.equal(p, m.to(dtype))
    ref_ps, ref_opt = run_torch(masters0, [[g.float() for g in gs] for gs in grads_seq],
                                lr=1e-2, lr_decay=0.1, weight_decay=0.1,
                                initial_accumulator_value=0.1)
    for i, p in enumerate(ref_ps):
        assert_fp32_close(masters[i], p.detach())
        assert_fp32_close(state.sums[i], ref_opt.state[p]["sum"])


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_within_one_ulp_of_fp32_update(device, backend):
    shapes = [(4097,), (0,), (31, 3), ()]
    params0 = [torch.randn(s, device=device).to(torch.bfloat16) for s in shapes]
    init = [{"step": torch.tensor(5.0), "sum": torch.rand(s, device=device)} for s in shapes]
    grads = rand_grads(params0, 1)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
    state = SimpleNamespace(sums=[s["sum"].clone() for s in init],
                            steps=[s["step"].clone().to(device) for s in init])
    out = run_op(params0, grads, backend, state=state, sr_seed=seed, lr=1e-3, weight_decay=0.1)
    ref_ps, _ = run_torch([p.float() for p in params0], [[g.float() for g in grads[0]]],
                          init_state=init, lr=1e-3, weight_decay=0.1)
    rtol, atol = tol(torch.float32).values()
    for got, want in zip(out.params, ref_ps):
        want = want.detach().double()
        assert got.dtype == torch.bfloat16
        bound = SR_MAX_ULPS * spacing(torch.bfloat16, want) + atol + rtol * want.abs()
        assert ((got.double() - want).abs() <= bound).all()
    assert not torch.equal(out.sums[0], out.sums[0].bfloat16().float())


def _sr_pairs():
    bes = [b for d, b in DEVICE_BACKENDS if d == "cpu"]
    return [(a, b) for i, a in enumerate(bes) for b in bes[i + 1:]]


@pytest.mark.parametrize("backend_a,backend_b", _sr_pairs())
def test_sr_bits_agree_across_backends(backend_a, backend_b):
    shapes = [(4097,), (0,), (300, 7), (), (70001,)]
    params0 = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    sums = [torch.rand(s) for s in shapes]
    grads = rand_grads(params0, 1)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)

    def go(be, sr):
        state = SimpleNamespace(sums=[s.clone() for s in sums],
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
    def lists(shapes, dtype, state_dtype, master):
        ps = [torch.randn(s, device=device).to(dtype) for s in shapes]
        gs = [torch.randn(s, device=device).to(dtype) for s in shapes]
        ss = [torch.rand(s, device=device).to(state_dtype) for s in shapes]
        ms = [p.float() for p in ps] if master else []
        steps = [torch.full((), 2.0, device=device) for _ in shapes]
        return [ps, gs, ss, ms, steps]

    f64 = torch.tensor(1e-3, dtype=torch.float64, device=device)
    f32 = torch.tensor(1e-2, dtype=torch.float32, device=device)
    return {
        "fp32": (*lists([(65,), (3, 4)], torch.float32, torch.float32, False), f64, 0.0, 0.0,
                 1e-10, False, None, None, None, backend),
        "bf16_master_scaler": (
            *lists([(65,), ()], torch.bfloat16, torch.float32, True), f32, 0.1, 0.1, 1e-10, False,
            torch.tensor(4.0, device=device), torch.tensor(0.0, device=device), None, backend),
        "bf16_sr_maximize": (
            *lists([(65,), (2, 3)], torch.bfloat16, torch.float32, False), f64, 0.0, 0.1, 1e-10,
            True, None, None, torch.tensor(1234, dtype=torch.int64, device=device), backend),
        "fp16_states_fp16": (*lists([(65,)], torch.float16, torch.float16, False), f64, 0.5, 0.0,
                             1e-3, False, None, None, None, backend),
    }


@pytest.mark.parametrize("sample", ["fp32", "bf16_master_scaler", "bf16_sr_maximize",
                                    "fp16_states_fp16"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend, sample):
    torch.library.opcheck(torch.ops.dlopt.adagrad_step.default,
                          _opcheck_samples(device, backend)[sample])
