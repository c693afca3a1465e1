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

from optim_op_helpers import (DEVICE_BACKENDS, DTYPES, SHAPE_NAMES, assert_fp32_close,
                              assert_sr_within_one_ulp, backend_state_cases,
                              check_found_inf_skips_everything, check_grad_scale_unscales,
                              check_poisoned_views, check_sr_bits_agree, check_twin_and_oracle,
                              cpu_backend_pairs, dtype_id, found_inf_inputs, lr_as_given,
                              master_inputs, pop_lr_dtype, rand_grads, rand_params, run_op_steps,
                              run_torch_optim, shapes_for, sr_seed)
from reference import adagrad_float64

op = torch.ops.dlopt.adagrad_step


def new_state(params, state_dtype=None, init=0.0, step=0.0):
    sd = lambda p: state_dtype or p.dtype  # noqa: E731
    return SimpleNamespace(sums=[torch.full_like(p, init, dtype=sd(p)) for p in params],
                           steps=[torch.full((), step, device=p.device) for p in params])


def state_from(init):
    """Our lists from torch-layout per-param states ({"step": a CPU tensor, as torch keeps
    it, "sum"}), on the sums' device."""
    return SimpleNamespace(sums=[s["sum"].clone() for s in init],
                           steps=[s["step"].clone().to(s["sum"].device) for s in init])


def run_op(params, grads_seq, backend, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
           initial_accumulator_value=0.0, eps=1e-10, maximize=False, state_dtype=None,
           state=None, masters=None, sr_seed=None, grad_scale=None, found_inf=None,
           lr_dtype=torch.float64, clone=True):
    """len(grads_seq) op calls (optim_op_helpers.run_op_steps)."""
    state = state or new_state(params, state_dtype, initial_accumulator_value)

    def step(k, ps, grads, st, ms, lr_t):
        op(ps, grads, st.sums, ms, st.steps, lr_t, lr_decay, weight_decay, eps, maximize,
           grad_scale, found_inf, sr_seed, backend)

    return run_op_steps(step, params, grads_seq, state, masters=masters, lr=lr,
                        lr_dtype=lr_dtype, found_inf=found_inf, clone=clone)


def run_torch(params, grads_seq, *, init_state=None, **hp):
    """torch.optim.Adagrad (for-loop implementation) on clones of `params`."""
    return run_torch_optim(torch.optim.Adagrad, params, grads_seq, init_state=init_state, **hp)


def check(ours, params0, grads_seq, hp, init_state=None):
    """fp32: ours ~ torch ~ float64 oracle (params and sums); bf16/fp16: ours' error
    against the oracle at most LOWP_ERR_RATIO x torch's."""
    ref_ps, ref_opt = run_torch(params0, grads_seq, init_state=init_state, **hp)

    def oracle(i, p0, gi, trace):
        st0 = dict(state_sum=init_state[i]["sum"], step=int(init_state[i]["step"])) \
            if init_state else {}
        p, osum = adagrad_float64(p0, gi, trace=trace, **hp, **st0)
        return p, {"sum": osum}

    check_twin_and_oracle(ours, params0, grads_seq, ref_ps, ref_opt, oracle,
                          lambda i: {"sum": ours.sums[i]})


# ------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_shapes_match_torch_and_oracle(device, backend, dtype, shape_name):
    params0 = rand_params(shapes_for(shape_name, device, backend), device, dtype)
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
    lr_dtype = pop_lr_dtype(hp)
    if dtype == torch.float16:
        # as torch's own optimizer tests do for fp16: eps 1e-10 is 0 in fp16
        hp["eps"] = max(hp.get("eps", 1e-10), 1e-3)
    params0 = rand_params([(4097,), (33, 7), ()], device, dtype)
    grads_seq = rand_grads(params0, 4, scales=[1.0, 3.0, 0.1, 0.5])
    ours = run_op(params0, grads_seq, backend, state_dtype=state_dtype, lr_dtype=lr_dtype, **hp)
    assert all(s.dtype == (state_dtype or dtype) for s in ours.sums)
    check(ours, params0, grads_seq, lr_as_given(hp, lr_dtype))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_resume_from_step(device, backend):
    """Each tensor's own step drives its lr decay: resume two tensors at steps 7 and 2
    with random sums, as after loading a checkpoint."""
    params0 = rand_params([(1000,), (5, 3)], device)
    init = [{"step": torch.tensor(float(s)), "sum": torch.rand_like(p)}
            for p, s in zip(params0, (7, 2))]
    grads_seq = rand_grads(params0, 2)
    hp = dict(lr=0.1, lr_decay=0.3, weight_decay=0.01)
    ours = run_op(params0, grads_seq, backend, state=state_from(init), **hp)
    check(ours, params0, grads_seq, hp, init_state=init)
    assert [float(s) for s in ours.steps] == [9.0, 4.0]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_lists(device, backend):
    op([], [], [], [], [], torch.tensor(1e-3, dtype=torch.float64), 0.0, 0.0, 1e-10, False, None,
       None, None, backend)


# ------------------------------------------------------------------- GradScaler args


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_scale_unscales(device, backend):
    params0 = rand_params([(4097,), (7, 9)], device)
    grads_seq = rand_grads(params0, 3)
    hp = dict(lr_decay=0.1, weight_decay=0.1)
    _, scaled = check_grad_scale_unscales(run_op, params0, grads_seq, backend, **hp)
    check(scaled, params0, grads_seq, dict(hp, lr=1e-2))


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_found_inf_skips_everything(device, backend, master):
    params0, masters = found_inf_inputs(device, master)
    state = SimpleNamespace(sums=[torch.rand_like(p, dtype=torch.float32) for p in params0],
                            steps=[torch.full((), 3.0, device=device) for _ in params0])
    grads = rand_grads(params0, 1)
    check_found_inf_skips_everything(run_op, params0, grads, backend, masters, state,
                                     weight_decay=0.1)


# -------------------------------------------------------------------- poisoned memory


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_views_into_poisoned_buffers(device, backend, dtype):
    """Every tensor the op touches is a view into a NaN-filled buffer
    (optim_op_helpers.check_poisoned_views)."""
    p0 = rand_params([(4097,), (4097,)], device, dtype)
    check_poisoned_views(run_op, lambda ps: new_state(ps, init=0.1), backend, p0,
                         rand_grads(p0, 2), lr_decay=0.1, weight_decay=0.1,
                         initial_accumulator_value=0.1, eps=1e-3)


# --------------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_master_weights(device, backend, dtype):
    """With fp32 masters the params are outputs only (NaN before the first step), equal
    to the master rounded to nearest after each step; masters follow torch's fp32
    Adagrad."""
    masters0, params = master_inputs(device, dtype)
    grads_seq = rand_grads(params, 3)
    hp = dict(lr=1e-2, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.1)
    out = run_op(params, grads_seq, backend, masters=masters0, state=new_state(masters0, init=0.1),
                 **hp)
    ref_ps, ref_opt = run_torch(masters0, [[g.float() for g in gs] for gs in grads_seq], **hp)
    for i, p in enumerate(ref_ps):
        assert_fp32_close(out.masters[i], p.detach())
        assert_fp32_close(out.sums[i], ref_opt.state[p]["sum"])


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_within_one_ulp_of_fp32_update(device, backend):
    shapes = [(4097,), (0,), (31, 3), ()]
    params0 = rand_params(shapes, device, torch.bfloat16)
    init = [{"step": torch.tensor(5.0), "sum": torch.rand(s, device=device)}
            for s in shapes]
    grads = rand_grads(params0, 1)
    out = run_op(params0, grads, backend, state=state_from(init), sr_seed=sr_seed(device),
                 lr=1e-3, weight_decay=0.1)
    ref_ps, _ = run_torch([p.float() for p in params0], [[g.float() for g in grads[0]]],
                          init_state=init, lr=1e-3, weight_decay=0.1)
    assert_sr_within_one_ulp(out.params, ref_ps)
    assert not torch.equal(out.sums[0], out.sums[0].bfloat16().float())


@pytest.mark.parametrize("backend_a,backend_b", cpu_backend_pairs())
def test_sr_bits_agree_across_backends(backend_a, backend_b):
    shapes = [(4097,), (0,), (300, 7), (), (70001,)]
    params0 = rand_params(shapes, "cpu", torch.bfloat16)
    sums = [torch.rand(s) for s in shapes]
    grads = rand_grads(params0, 1)
    seed = sr_seed("cpu")

    def go(be, sr):
        state = SimpleNamespace(sums=[t.clone() for t in sums],
                                steps=[torch.full((), 4.0) for _ in shapes])
        return run_op(params0, grads, be, state=state, sr_seed=seed if sr else None, lr=1e-3,
                      weight_decay=0.1).params

    check_sr_bits_agree(go, backend_a, backend_b)


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
