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

from optim_op_helpers import (DEVICE_BACKENDS, DTYPES, STATE_CASES, STATE_IDS,
                              assert_sr_within_one_ulp, check_found_inf_skips_everything,
                              check_grad_scale_unscales, check_poisoned_views, check_sr_bits_agree,
                              cpu_backend_pairs, dtype_id, found_inf_inputs, interpreted,
                              lr_as_given, master_inputs, pop_lr_dtype, rand_grads, rand_params,
                              run_op_steps, scaled, small_shapes, sr_seed)
from reference import LambFloat64
from tolerances import LAMB_LOWP_ULPS_PER_STEP, LAMB_SIGN_MARGIN, tol, ulp_error

op = torch.ops.dlopt.lamb_step
norm_op = torch.ops.dlopt.multi_tensor_norm

SHAPES = {
    "1": lambda: [(1,)],
    "4097": lambda: [(4097,)],
    "chunk_edges": lambda: [(32768,), (65537,)],
    "many_small": lambda: small_shapes(120),
    "0dim": lambda: [()],
    "zero_size": lambda: [(0,), (3, 0, 2), (7,)],
}


def new_state(params, state_dtype=None):
    sd = lambda p: state_dtype or p.dtype  # noqa: E731
    return SimpleNamespace(m=[torch.zeros_like(p, dtype=sd(p)) for p in params],
                           v=[torch.zeros_like(p, dtype=sd(p)) for p in params],
                           steps=[torch.zeros((), device=p.device) for p in params])


def run_op(params, grads_seq, backend, *, lr=1e-2, betas=(0.9, 0.999), eps=1e-6,
           weight_decay=0.01, bias_correction=True, max_grad_norm=0.0, state_dtype=None,
           masters=None, sr_seed=None, grad_scale=None, found_inf=None, state=None,
           lr_dtype=torch.float64, clone=True):
    """len(grads_seq) op calls (optim_op_helpers.run_op_steps); the global grad norm of
    each step comes from multi_tensor_norm on the same backend (on the grads as passed)."""
    state = new_state(params, state_dtype) if state is None else state

    def step(k, ps, grads, st, ms, lr_t):
        gn = norm_op(grads, 2.0, backend)[1] if max_grad_norm > 0 else None
        op(ps, grads, st.m, st.v, ms, st.steps, lr_t, betas[0], betas[1], weight_decay, eps,
           bias_correction, max_grad_norm, gn, grad_scale, found_inf, sr_seed, backend)

    return run_op_steps(step, params, grads_seq, state, masters=masters, lr=lr,
                        lr_dtype=lr_dtype, found_inf=found_inf, clone=clone)


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
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_shapes_match_oracle(device, backend, dtype, shape_name):
    shapes = SHAPES[shape_name]()
    n_steps = 3
    if shape_name == "many_small" and interpreted(device, backend):
        shapes, n_steps = small_shapes(15), 2  # ~1 ms per program instance interpreted
    params0 = rand_params(shapes, device, dtype)
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
@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("dtype,state_dtype", STATE_CASES[:3], ids=STATE_IDS[:3])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_flags_match_oracle(device, backend, dtype, state_dtype, flags):
    hp = dict(FLAGS[flags])
    lr_dtype = pop_lr_dtype(hp)
    params0 = rand_params([(4097,), (33, 7), ()], device, dtype)
    grads_seq = rand_grads(params0, 4, scales=[1.0, 3.0, 0.1, 0.5])
    ours = run_op(params0, grads_seq, backend, state_dtype=state_dtype, lr_dtype=lr_dtype, **hp)
    assert all(t.dtype == (state_dtype or dtype) for t in ours.m + ours.v)
    check(ours, params0, grads_seq, lr_as_given(hp, lr_dtype))


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


def test_cpu_huge_params_keep_a_finite_trust_ratio():
    """Params above sqrt(FLT_MAX) overflow the CPU kernel's fp32 partial sums of p^2; the
    chunk's sums are then redone in double, so the step still matches the oracle."""
    params = [torch.randn(4097) * 3e19, torch.randn(300)]
    grads_seq = [[torch.randn_like(p) for p in params] for _ in range(2)]
    ours = run_op(params, grads_seq, "cpu")
    check(ours, params, grads_seq, {})


def test_cpu_cache_groups_match_oracle():
    """The CPU kernel runs both passes per group of tensors of at most 32 MB of state:
    a list spanning several groups (a tensor larger than a group, small ones between)
    gives each tensor its own trust ratio as the oracle does."""
    params = [torch.randn(2_500_000), torch.randn(5), torch.randn(300_000),
              torch.randn(1_700_000), torch.randn(7, 3)]
    grads_seq = [[torch.randn_like(p) for p in params] for _ in range(2)]
    ours = run_op(params, grads_seq, "cpu")
    check(ours, params, grads_seq, {})


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
    params0 = rand_params([(4097,), (7, 9)], device)
    grads_seq = rand_grads(params0, 3)
    hp = dict(max_grad_norm=2.0)
    _, out = check_grad_scale_unscales(run_op, params0, grads_seq, backend, **hp)
    s = 1000.5
    check(out, params0, scaled(grads_seq, s), hp, grad_scale=s)


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_found_inf_skips_everything(device, backend, master):
    params0, masters = found_inf_inputs(device, master)
    state = SimpleNamespace(m=[torch.randn_like(p, dtype=torch.float32) for p in params0],
                            v=[torch.rand_like(p, dtype=torch.float32) for p in params0],
                            steps=[torch.full((), 3.0, device=device) for _ in params0])
    grads = rand_grads(params0, 1)
    for clip in (1.0, 0.0):  # with and without the global-norm clipping
        check_found_inf_skips_everything(run_op, params0, grads, backend, masters, state,
                                         max_grad_norm=clip)


# -------------------------------------------------------------------- poisoned memory


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_views_into_poisoned_buffers(device, backend, dtype):
    """Every tensor is a view into a NaN-filled buffer
    (optim_op_helpers.check_poisoned_views)."""
    p0 = rand_params([(4097,), (4097,)], device, dtype)
    check_poisoned_views(run_op, new_state, backend, p0, rand_grads(p0, 2), max_grad_norm=1.0)


# --------------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_master_weights(device, backend, dtype):
    """With fp32 masters the params are outputs only (NaN before the first step): after
    each step param == master rounded; the masters follow the oracle like fp32 params."""
    masters0, params = master_inputs(device, dtype)
    grads_seq = rand_grads(params, 3)
    out = run_op(params, grads_seq, backend, masters=masters0, state=new_state(masters0),
                 max_grad_norm=1.0)
    o = oracle(masters0, [[g.float() for g in gs] for gs in grads_seq], max_grad_norm=1.0)
    for i in range(len(masters0)):
        torch.testing.assert_close(out.masters[i].double(), o.params[i], **tol(torch.float32))


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_within_one_ulp_of_fp32_update(device, backend):
    shapes = [(4097,), (0,), (31, 3), ()]
    params0 = rand_params(shapes, device, torch.bfloat16)
    grads = rand_grads(params0, 1)
    out = run_op(params0, grads, backend, state_dtype=torch.float32, sr_seed=sr_seed(device))
    want = run_op([p.float() for p in params0], [[g.float() for g in grads[0]]], backend)
    assert_sr_within_one_ulp(out.params, want.params)
    # not round-to-nearest: some elements went to the farther neighbour
    near = torch.cat([w.bfloat16().reshape(-1) for w in want.params])
    assert not torch.equal(torch.cat([p.reshape(-1) for p in out.params]), near)


@pytest.mark.parametrize("backend_a,backend_b", cpu_backend_pairs())
def test_backends_agree_sr_bits(backend_a, backend_b):
    shapes = [(4097,), (0,), (300, 7), ()]
    params0 = rand_params(shapes, "cpu", torch.bfloat16)
    grads = rand_grads(params0, 1)
    seed = sr_seed("cpu")
    check_sr_bits_agree(lambda be, sr: run_op(
        params0, grads, be, state_dtype=torch.float32, sr_seed=seed if sr else None,
        max_grad_norm=1.0).params, backend_a, backend_b)


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
