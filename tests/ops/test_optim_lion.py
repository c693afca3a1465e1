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

from types import SimpleNamespace

import pytest
import torch

from optim_op_helpers import (DEVICE_BACKENDS, DTYPES, SHAPE_NAMES, STATE_CASES, STATE_IDS,
                              assert_fp32_close, assert_lowp_close, assert_sr_within_one_ulp,
                              check_found_inf_skips_everything, check_grad_scale_unscales,
                              check_poisoned_views, check_sr_bits_agree, check_sr_unbiased,
                              cpu_backend_pairs, dtype_id, found_inf_inputs, master_inputs,
                              pop_lr_dtype, rand_params, run_op_steps, shapes_for, sr_seed,
                              sr_unbiased_inputs)
from reference import lion_float64
from tolerances import SIGN_EXCLUDED_MAX, SIGN_MARGIN

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
           found_inf=None, lr_dtype=torch.float64, state=None, clone=True):
    """len(grads_seq) op calls (optim_op_helpers.run_op_steps)."""
    state = new_state(params, state_dtype) if state is None else state

    def step(k, ps, grads, st, ms, lr_t):
        op(ps, grads, st.m, ms, st.steps, lr_t, betas[0], betas[1], weight_decay, maximize,
           grad_scale, found_inf, sr_seed, backend)

    return run_op_steps(step, params, grads_seq, state, masters=masters, lr=lr,
                        lr_dtype=lr_dtype, found_inf=found_inf, clone=clone)


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


# (the shared odd shapes, with 70001 (3 CPU chunks, 2 interpreted Triton blocks) for 278011)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_shapes_match_oracle(device, backend, dtype, shape_name):
    n_steps = 2 if shape_name == "many_small" else 3
    params0 = rand_params(shapes_for(shape_name, device, backend), device, dtype)
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
    lr_dtype = pop_lr_dtype(hp)
    params0 = rand_params([(4097,), (33, 7), ()], device, dtype)
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
    params0 = rand_params([(4097,), (7, 9)], device)
    grads_seq = lion_grads(params0, 3)
    hp = dict(weight_decay=0.1, maximize=True)
    plain, scaled = check_grad_scale_unscales(run_op, params0, grads_seq, backend, **hp)
    # any other scale: the unscaled grads' signs and momentum
    for a, b in zip(scaled.params + scaled.m, plain.params + plain.m):
        assert_fp32_close(a, b)
    check_against_oracle(scaled, params0, grads_seq, hp)


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_found_inf_skips_everything(device, backend, master):
    params0, masters = found_inf_inputs(device, master)
    state = SimpleNamespace(m=[torch.randn_like(p, dtype=torch.float32) for p in params0],
                            steps=[torch.full((), 3.0, device=device) for _ in params0])
    grads = lion_grads(params0, 1)
    check_found_inf_skips_everything(run_op, params0, grads, backend, masters, state,
                                     weight_decay=0.1)


# -------------------------------------------------------------------- poisoned memory


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_views_into_poisoned_buffers(device, backend, dtype):
    """Every tensor the op reads or writes is a view into a NaN-filled buffer
    (optim_op_helpers.check_poisoned_views)."""
    p0 = rand_params([(4097,), (4097,)], device, dtype)
    check_poisoned_views(run_op, new_state, backend, p0, lion_grads(p0, 2), weight_decay=0.1)


# --------------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_master_weights(device, backend, dtype):
    """With fp32 masters the params are outputs only: poisoned with NaN before the first
    step, each step leaves param == master rounded to nearest, and the masters follow
    the float64 oracle as an fp32 param would."""
    masters0, params = master_inputs(device, dtype)
    grads_seq = lion_grads(params, 3)
    out = run_op(params, grads_seq, backend, masters=masters0, state=new_state(masters0),
                 weight_decay=0.1)
    for i, m0 in enumerate(masters0):
        oracle, oracle_m, _ = lion_float64(m0, [g[i] for g in grads_seq], lr=1e-2,
                                           weight_decay=0.1)
        assert_fp32_close(out.masters[i].double(), oracle)
        assert_fp32_close(out.m[i].double(), oracle_m)


# ---------------------------------------------------------------- stochastic rounding


def _sr_setup(device, shapes):
    """bf16 params, fp32 momentum from the middle of training (|m| <= 0.05, so the
    LION_GRADS margin still holds)."""
    params0 = rand_params(shapes, device, torch.bfloat16)
    m0 = [torch.empty(s, device=device).uniform_(-0.05, 0.05) for s in shapes]
    return params0, m0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_within_one_ulp_of_fp32_update(device, backend):
    shapes = [(4097,), (0,), (31, 3), ()]
    params0, m0 = _sr_setup(device, shapes)
    grads = lion_grads(params0, 1)
    out = run_op(params0, grads, backend, state=new_state(params0, exp_avgs=m0),
                 sr_seed=sr_seed(device), lr=1e-3, weight_decay=0.1)
    wants = []
    for i, p0 in enumerate(params0):
        want, want_m, _ = lion_float64(p0, [grads[0][i]], lr=1e-3, weight_decay=0.1,
                                       exp_avg=m0[i])
        wants.append(want)
        assert_fp32_close(out.m[i].double(), want_m)  # exact fp32, not rounded to bf16
    assert_sr_within_one_ulp(out.params, wants)
    assert not torch.equal(out.m[0], out.m[0].bfloat16().float())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_unbiased(device, backend):
    """One fixed fp32 value rounded stochastically many times (65536 elements x 4 seeds):
    the mean approaches the value; round-to-nearest would be > 100 sigma away."""
    lr, p0, g = sr_unbiased_inputs(device)
    value = float(torch.tensor(1.0, dtype=torch.float32) - torch.tensor(lr, dtype=torch.float32))
    check_sr_unbiased(value, lambda seed: run_op([p0], [[g]], backend, lr=lr,
                                                 state_dtype=torch.float32,
                                                 sr_seed=seed).params[0],
                      device, q_margin=0.02)


@pytest.mark.parametrize("backend_a,backend_b", cpu_backend_pairs())
def test_sr_bits_agree_across_backends(backend_a, backend_b):
    """Same seed, same inputs: the backends draw the same random bits per (tensor,
    element), so the rounded bf16 bits agree on (nearly) every element."""
    shapes = [(4097,), (0,), (300, 7), (), (70001,)]
    params0, m0 = _sr_setup("cpu", shapes)
    grads = lion_grads(params0, 1)
    seed = sr_seed("cpu")
    check_sr_bits_agree(lambda be, sr: run_op(
        params0, grads, be, state=new_state(params0, exp_avgs=m0), sr_seed=seed if sr else None,
        weight_decay=0.1, lr=1e-3).params, backend_a, backend_b)


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
