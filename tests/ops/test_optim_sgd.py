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

from optim_op_helpers import (DEVICE_BACKENDS, DTYPES, SHAPE_NAMES, assert_fp32_close,
                              assert_sr_within_one_ulp, backend_state_cases,
                              check_found_inf_skips_everything, check_grad_scale_unscales,
                              check_poisoned_views, check_sr_bits_agree, check_twin_and_oracle,
                              cpu_backend_pairs, dtype_id, found_inf_inputs, lr_as_given,
                              master_inputs, pop_lr_dtype, rand_grads, rand_params, run_op_steps,
                              run_torch_optim, shapes_for, sr_seed)
from reference import sgd_float64
from tolerances import tol

op = torch.ops.dlopt.sgd_step


def new_state(params, state_dtype=None):
    """Momentum buffers full of NaN: a new buffer must be written, never read."""
    return SimpleNamespace(bufs=[torch.full_like(p, float("nan"), dtype=state_dtype or p.dtype)
                                 for p in params])


def run_op(params, grads_seq, backend, *, lr=1e-2, momentum=0.0, dampening=0.0,
           weight_decay=0.0, nesterov=False, maximize=False, state_dtype=None, state=None,
           new_buffers=None, masters=None, sr_seed=None, grad_scale=None, found_inf=None,
           lr_dtype=torch.float64, clone=True):
    """len(grads_seq) op calls, as the optimizer makes them: the first call marks the
    buffers as new (written with the grad, never read) when the state is fresh (or
    new_buffers says so), the buffer list is passed only with momentum."""
    new = state is None if new_buffers is None else new_buffers
    state = new_state(params, state_dtype) if state is None else state

    def step(k, ps, grads, st, ms, lr_t):
        flags = [True] * len(ps) if (new and k == 0 and momentum) else []
        op(ps, grads, st.bufs if momentum else [], ms, lr_t, weight_decay, momentum, dampening,
           nesterov, maximize, flags, grad_scale, found_inf, sr_seed, backend)

    return run_op_steps(step, params, grads_seq, state, masters=masters, lr=lr,
                        lr_dtype=lr_dtype, found_inf=found_inf, clone=clone)


def run_torch(params, grads_seq, *, init_bufs=None, **hp):
    """torch.optim.SGD (for-loop implementation) on clones of `params`."""
    init = None if init_bufs is None else [{"momentum_buffer": b} for b in init_bufs]
    return run_torch_optim(torch.optim.SGD, params, grads_seq, init_state=init, **hp)


def check(ours, params0, grads_seq, hp, init_bufs=None):
    """fp32: ours ~ torch ~ float64 oracle (params and buffers); bf16/fp16: ours' error
    against the oracle at most LOWP_ERR_RATIO x torch's."""
    ref_ps, ref_opt = run_torch(params0, grads_seq, init_bufs=init_bufs, **hp)

    def oracle(i, p0, gi, trace):
        b0 = None if init_bufs is None else init_bufs[i]
        p, buf = sgd_float64(p0, gi, buf=b0, trace=trace, **hp)
        return p, {"momentum_buffer": buf}

    check_twin_and_oracle(ours, params0, grads_seq, ref_ps, ref_opt, oracle,
                          lambda i: {"momentum_buffer": ours.bufs[i]})


# ------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_shapes_match_torch_and_oracle(device, backend, dtype, shape_name):
    params0 = rand_params(shapes_for(shape_name, device, backend), device, dtype)
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
    lr_dtype = pop_lr_dtype(hp)
    params0 = rand_params([(4097,), (33, 7), ()], device, dtype)
    grads_seq = rand_grads(params0, 4, scales=[1.0, 3.0, 0.1, 0.5])
    ours = run_op(params0, grads_seq, backend, state_dtype=state_dtype, lr_dtype=lr_dtype, **hp)
    if hp.get("momentum"):
        assert all(b.dtype == (state_dtype or dtype) for b in ours.bufs)
    check(ours, params0, grads_seq, lr_as_given(hp, lr_dtype))


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
    params0 = rand_params([(4097,), (7, 9)], device)
    grads_seq = rand_grads(params0, 3)
    hp = dict(momentum=0.9, weight_decay=0.1, nesterov=True)
    _, scaled = check_grad_scale_unscales(run_op, params0, grads_seq, backend, **hp)
    check(scaled, params0, grads_seq, dict(hp, lr=1e-2))


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_found_inf_skips_everything(device, backend, master):
    params0, masters = found_inf_inputs(device, master)
    state = SimpleNamespace(bufs=[torch.randn_like(p, dtype=torch.float32) for p in params0])
    grads = rand_grads(params0, 1)
    check_found_inf_skips_everything(run_op, params0, grads, backend, masters, state,
                                     momentum=0.9, weight_decay=0.1)


# -------------------------------------------------------------------- poisoned memory


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_views_into_poisoned_buffers(device, backend, dtype):
    """Every tensor the op touches is a view into a NaN-filled buffer, new buffers on the
    first call (optim_op_helpers.check_poisoned_views)."""
    p0 = rand_params([(4097,), (4097,)], device, dtype)
    check_poisoned_views(run_op, lambda ps: SimpleNamespace(bufs=[torch.zeros_like(p) for p in ps]),
                         backend, p0, rand_grads(p0, 2), new_buffers=True, momentum=0.9,
                         weight_decay=0.1, nesterov=True)


# --------------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_master_weights(device, backend, dtype):
    """With fp32 masters the params are outputs only (NaN before the first step), equal
    to the master rounded to nearest after each step; masters follow torch's fp32 SGD."""
    masters0, params = master_inputs(device, dtype)
    grads_seq = rand_grads(params, 3)
    hp = dict(lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True)
    out = run_op(params, grads_seq, backend, masters=masters0, state_dtype=torch.float32, **hp)
    ref_ps, ref_opt = run_torch(masters0, [[g.float() for g in gs] for gs in grads_seq], **hp)
    for i, p in enumerate(ref_ps):
        assert_fp32_close(out.masters[i], p.detach())
        assert_fp32_close(out.bufs[i], ref_opt.state[p]["momentum_buffer"])


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_within_one_ulp_of_fp32_update(device, backend):
    shapes = [(4097,), (0,), (31, 3), ()]
    params0 = rand_params(shapes, device, torch.bfloat16)
    bufs = [0.1 * torch.randn(s, device=device) for s in shapes]
    grads = rand_grads(params0, 1)
    hp = dict(lr=1e-3, momentum=0.9, weight_decay=0.1)
    out = run_op(params0, grads, backend, state=SimpleNamespace(bufs=[b.clone() for b in bufs]),
                 sr_seed=sr_seed(device), **hp)
    ref_ps, _ = run_torch([p.float() for p in params0], [[g.float() for g in grads[0]]],
                          init_bufs=bufs, **hp)
    assert_sr_within_one_ulp(out.params, ref_ps)
    # the fp32 buffers are exact fp32 updates, not rounded to bf16
    assert not torch.equal(out.bufs[0], out.bufs[0].bfloat16().float())


# momentum 0: the CPU kernel walks plain SGD's two streams as two halves of each chunk
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("backend_a,backend_b", cpu_backend_pairs())
def test_sr_bits_agree_across_backends(backend_a, backend_b, momentum):
    shapes = [(4097,), (0,), (300, 7), (), (70001,)]
    params0 = rand_params(shapes, "cpu", torch.bfloat16)
    bufs = [0.1 * torch.randn(s) for s in shapes]
    grads = rand_grads(params0, 1)
    seed = sr_seed("cpu")
    check_sr_bits_agree(lambda be, sr: run_op(
        params0, grads, be, state=SimpleNamespace(bufs=[b.clone() for b in bufs]),
        sr_seed=seed if sr else None, momentum=momentum, weight_decay=0.1, lr=1e-3).params,
        backend_a, backend_b)


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
