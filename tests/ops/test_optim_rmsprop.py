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

from optim_op_helpers import (DEVICE_BACKENDS, DTYPES, SHAPE_NAMES, assert_fp32_close,
                              assert_sr_within_one_ulp, assert_state_close_normwise,
                              backend_state_cases, check_found_inf_skips_everything,
                              check_grad_scale_unscales, check_poisoned_views, check_sr_bits_agree,
                              check_twin_and_oracle, cpu_backend_pairs, dtype_id, found_inf_inputs,
                              lr_as_given, master_inputs, pop_lr_dtype, rand_grads, rand_params,
                              run_op_steps, run_torch_optim, shapes_for, sr_seed)
from reference import rmsprop_float64

op = torch.ops.dlopt.rmsprop_step
KEYS = {"v": "square_avg", "ga": "grad_avg", "buf": "momentum_buffer"}  # ours -> torch's


def new_state(params, state_dtype=None):
    sd = lambda p: state_dtype or p.dtype  # noqa: E731
    return SimpleNamespace(v=[torch.zeros_like(p, dtype=sd(p)) for p in params],
                           ga=[torch.zeros_like(p, dtype=sd(p)) for p in params],
                           buf=[torch.zeros_like(p, dtype=sd(p)) for p in params],
                           steps=[torch.zeros((), device=p.device) for p in params])


def state_from(init):
    """Our lists from torch-layout per-param states (step a CPU tensor, as torch keeps
    it; a missing grad_avg / momentum_buffer gives an empty list)."""
    dev = init[0]["square_avg"].device
    return SimpleNamespace(**{k: [s[key].clone() for s in init if key in s]
                              for k, key in KEYS.items()},
                           steps=[s["step"].clone().to(dev) for s in init])


def run_op(params, grads_seq, backend, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
           momentum=0.0, centered=False, maximize=False, state_dtype=None, state=None,
           masters=None, sr_seed=None, grad_scale=None, found_inf=None,
           lr_dtype=torch.float64, clone=True):
    """len(grads_seq) op calls (optim_op_helpers.run_op_steps). The grad_avgs /
    momentum_buffers lists are passed only when in use (empty otherwise)."""
    state = state or new_state(params, state_dtype)

    def step(k, ps, grads, st, ms, lr_t):
        op(ps, grads, st.v, st.ga if centered else [], st.buf if momentum > 0 else [], ms,
           st.steps, lr_t, alpha, eps, weight_decay, momentum, centered, maximize, grad_scale,
           found_inf, sr_seed, backend)

    return run_op_steps(step, params, grads_seq, state, masters=masters, lr=lr,
                        lr_dtype=lr_dtype, found_inf=found_inf, clone=clone)


def run_torch(params, grads_seq, *, init_state=None, **hp):
    """torch.optim.RMSprop (for-loop implementation) on clones of `params`."""
    return run_torch_optim(torch.optim.RMSprop, params, grads_seq, init_state=init_state, **hp)


def check(ours, params0, grads_seq, hp):
    """fp32: ours ~ torch ~ float64 oracle (params and every state torch keeps, normwise:
    the momentum buffer sums terms that cancel, judged against their magnitude);
    bf16/fp16: ours' error against the oracle at most LOWP_ERR_RATIO x torch's."""
    ref_ps, ref_opt = run_torch(params0, grads_seq, **hp)

    def oracle(i, p0, gi, trace):
        mag = []
        p, *states = rmsprop_float64(p0, gi, trace=trace, buf_magnitude=mag, **hp)
        return p, dict(zip(KEYS.values(), states)), {"momentum_buffer": mag[0]}

    check_twin_and_oracle(ours, params0, grads_seq, ref_ps, ref_opt, oracle,
                          lambda i: {key: getattr(ours, k)[i] for k, key in KEYS.items()},
                          state_close=assert_state_close_normwise)


def buf_magnitude(p0, grads, **hp):
    """The float64 oracle's magnitude of the momentum buffer's terms (the scale its
    fp32 rounding error is judged against: assert_state_close_normwise)."""
    mag = []
    rmsprop_float64(p0, grads, buf_magnitude=mag, **hp)
    return mag[0]


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
    params0 = rand_params(shapes_for(shape_name, device, backend), device, dtype)
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
    lr_dtype = pop_lr_dtype(hp)
    if dtype == torch.float16:
        # as torch's own optimizer tests do for fp16: eps 1e-8 is 0 in fp16
        hp["eps"] = 0.1
    _fp16_no_cancelling_decay(hp, dtype)
    params0 = rand_params([(4097,), (33, 7), ()], device, dtype)
    grads_seq = rand_grads(params0, 4, scales=[1.0, 3.0, 0.3, 0.5])
    ours = run_op(params0, grads_seq, backend, state_dtype=state_dtype, lr_dtype=lr_dtype, **hp)
    assert all(s.dtype == (state_dtype or dtype) for s in ours.v)
    check(ours, params0, grads_seq, lr_as_given(hp, lr_dtype))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_resume_from_state(device, backend):
    """Random states and a step count of 7, as after loading a checkpoint."""
    params0 = rand_params([(1000,), (5, 3)], device)
    init = [{"step": torch.tensor(7.0), "square_avg": torch.rand_like(p) + 0.5,
             "grad_avg": 0.1 * torch.randn_like(p), "momentum_buffer": torch.randn_like(p)}
            for p in params0]
    grads_seq = rand_grads(params0, 2)
    hp = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)
    ours = run_op(params0, grads_seq, backend, state=state_from(init), **hp)
    ref_ps, ref_opt = run_torch(params0, grads_seq, init_state=init, **hp)
    for i, p in enumerate(ref_ps):
        assert_fp32_close(ours.params[i], p.detach())
        mag = buf_magnitude(params0[i], [g[i] for g in grads_seq],
                            init=[init[i][key] for key in KEYS.values()], **hp)
        for k, key in KEYS.items():
            assert_state_close_normwise(getattr(ours, k)[i], ref_opt.state[p][key],
                                        mag if k == "buf" else None)
        assert float(ours.steps[i]) == 9.0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_unused_lists_are_ignored(device, backend):
    """Not centered / no momentum: grad_avgs and momentum_buffers are neither read nor
    written, whether passed or empty."""
    params0 = rand_params([(100,), (3, 4)], device)
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
    params0 = rand_params([(4097,), (7, 9)], device)
    grads_seq = rand_grads(params0, 3)
    hp = dict(momentum=0.9, centered=True, weight_decay=0.1, eps=1e-3)
    _, scaled = check_grad_scale_unscales(run_op, params0, grads_seq, backend, **hp)
    check(scaled, params0, grads_seq, dict(hp, lr=1e-2))


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_found_inf_skips_everything(device, backend, master):
    params0, masters = found_inf_inputs(device, master)
    f32 = dict(dtype=torch.float32)
    state = SimpleNamespace(v=[torch.rand_like(p, **f32) + 0.1 for p in params0],
                            ga=[0.01 * torch.randn_like(p, **f32) for p in params0],
                            buf=[torch.randn_like(p, **f32) for p in params0],
                            steps=[torch.full((), 3.0, device=device) for _ in params0])
    grads = rand_grads(params0, 1)
    check_found_inf_skips_everything(run_op, params0, grads, backend, masters, state,
                                     momentum=0.9, centered=True, weight_decay=0.1)


# -------------------------------------------------------------------- poisoned memory


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_views_into_poisoned_buffers(device, backend, dtype):
    """Every tensor the op touches is a view into a NaN-filled buffer
    (optim_op_helpers.check_poisoned_views)."""
    p0 = rand_params([(4097,), (4097,)], device, dtype)
    check_poisoned_views(run_op, new_state, backend, p0, rand_grads(p0, 2), momentum=0.9,
                         centered=True, weight_decay=0.1, eps=0.1)


# --------------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_master_weights(device, backend, dtype):
    """With fp32 masters the params are outputs only (NaN before the first step), equal
    to the master rounded to nearest after each step; masters follow torch's fp32
    RMSprop."""
    masters0, params = master_inputs(device, dtype)
    grads_seq = rand_grads(params, 3)
    hp = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.1, eps=1e-3)
    out = run_op(params, grads_seq, backend, masters=masters0, state=new_state(masters0), **hp)
    ref_ps, ref_opt = run_torch(masters0, [[g.float() for g in gs] for gs in grads_seq], **hp)
    for i, p in enumerate(ref_ps):
        assert_fp32_close(out.masters[i], p.detach())
        assert_fp32_close(out.v[i], ref_opt.state[p]["square_avg"])
        assert_state_close_normwise(out.buf[i], ref_opt.state[p]["momentum_buffer"],
                                    buf_magnitude(masters0[i], [g[i] for g in grads_seq], **hp))


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_within_one_ulp_of_fp32_update(device, backend):
    shapes = [(4097,), (0,), (31, 3), ()]
    params0 = rand_params(shapes, device, torch.bfloat16)
    init = [{"step": torch.tensor(5.0), "square_avg": torch.rand(s, device=device) + 0.1,
             "momentum_buffer": 0.01 * torch.randn(s, device=device)} for s in shapes]
    grads = rand_grads(params0, 1)
    hp = dict(lr=1e-3, momentum=0.9, weight_decay=0.1)
    out = run_op(params0, grads, backend, state=state_from(init), sr_seed=sr_seed(device), **hp)
    ref_ps, _ = run_torch([p.float() for p in params0], [[g.float() for g in grads[0]]],
                          init_state=init, **hp)
    assert_sr_within_one_ulp(out.params, ref_ps)
    assert not torch.equal(out.v[0], out.v[0].bfloat16().float())


@pytest.mark.parametrize("backend_a,backend_b", cpu_backend_pairs())
def test_sr_bits_agree_across_backends(backend_a, backend_b):
    shapes = [(4097,), (0,), (300, 7), (), (70001,)]
    params0 = rand_params(shapes, "cpu", torch.bfloat16)
    v0 = [torch.rand(s) + 0.1 for s in shapes]
    grads = rand_grads(params0, 1)
    seed = sr_seed("cpu")

    def go(be, sr):
        state = SimpleNamespace(v=[t.clone() for t in v0], ga=[], buf=[],
                                steps=[torch.full((), 4.0) for _ in shapes])
        return run_op(params0, grads, be, state=state, sr_seed=seed if sr else None, lr=1e-3,
                      weight_decay=0.1).params

    check_sr_bits_agree(go, backend_a, backend_b)


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
