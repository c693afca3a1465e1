"""torch.ops.dlopt.adam_step, per backend: against torch.optim.Adam (same dtype) and the
float64 oracle (tests/reference.py), over dtypes, odd shapes and every flag; master
weights, stochastic rounding, GradScaler arguments, poisoned memory around the
tensors it writes, and torch.library.opcheck.

Tolerances come from tests/tolerances.py only. Inputs are fresh random every run
(tests/conftest.py seeds torch per test; DLOPT_TEST_SEED=<n> fixes the seed).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from optim_op_helpers import (DEVICE_BACKENDS, DTYPES, SHAPES, STATE_CASES, STATE_IDS,
                              assert_sr_within_one_ulp, check_found_inf_skips_everything,
                              check_grad_scale_unscales, check_poisoned_views, check_sr_bits_agree,
                              check_sr_unbiased, cpu_backend_pairs, dtype_id, found_inf_inputs,
                              interpreted, lr_as_given, master_inputs, pop_lr_dtype, rand_grads,
                              rand_params, run_op_steps, run_torch_optim, small_shapes, sr_seed,
                              sr_unbiased_inputs)
from reference import adam_float64
from tolerances import LOWP_ERR_FLOOR_ULPS, LOWP_ERR_RATIO, tol, ulp_error

op = torch.ops.dlopt.adam_step
# the shared odd shapes, with many more small tensors (one launch per tensor)
ADAM_SHAPES = dict(SHAPES, many_small=lambda: small_shapes(200))


def new_state(params, state_dtype=None, amsgrad=False):
    sd = lambda p: state_dtype or p.dtype  # noqa: E731
    return SimpleNamespace(
        m=[torch.zeros_like(p, dtype=sd(p)) for p in params],
        v=[torch.zeros_like(p, dtype=sd(p)) for p in params],
        vmax=[torch.zeros_like(p, dtype=sd(p)) for p in params] if amsgrad else [],
        steps=[torch.zeros((), dtype=torch.float32, device=p.device) for p in params])


def run_op(params, grads_seq, backend, *, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
           weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False, state_dtype=None,
           masters=None, sr_seed=None, grad_scale=None, found_inf=None,
           lr_dtype=torch.float64, state=None, clone=True):
    """len(grads_seq) op calls (optim_op_helpers.run_op_steps)."""
    state = new_state(params, state_dtype, amsgrad) if state is None else state

    def step(k, ps, grads, st, ms, lr_t):
        op(ps, grads, st.m, st.v, st.vmax, ms, st.steps, lr_t, betas[0], betas[1], weight_decay,
           eps, amsgrad, maximize, decoupled, grad_scale, found_inf, sr_seed, backend)

    return run_op_steps(step, params, grads_seq, state, masters=masters, lr=lr,
                        lr_dtype=lr_dtype, found_inf=found_inf, clone=clone)


def run_torch(params, grads_seq, *, decoupled=False, init_state=None, **hp):
    """torch.optim.Adam (for-loop implementation, lr 1e-2 unless given) on clones of
    `params`."""
    return run_torch_optim(torch.optim.Adam, params, grads_seq, init_state=init_state,
                           decoupled_weight_decay=decoupled, **dict(dict(lr=1e-2), **hp))


def check_against_torch_and_oracle(ours, params0, grads_seq, hp):
    """fp32: ours ~ torch and ours ~ float64 oracle within the table's tolerance.
    bf16/fp16: ours' error vs the oracle (in ulps) at most LOWP_ERR_RATIO x torch's.
    Runs are kept to <= 3 steps: a correct kernel rounds the param once per step, so
    its error stays <= 1.5 ulps, inside the LOWP_ERR_RATIO x LOWP_ERR_FLOOR_ULPS floor
    even for a single element where torch happens to round well."""
    assert len(grads_seq) <= 3
    ref_ps, ref_opt = run_torch(params0, grads_seq, **hp)
    n = len(grads_seq)
    for i, p0 in enumerate(params0):
        oracle = adam_float64(p0, [g[i] for g in grads_seq], lr=hp.get("lr", 1e-2),
                              betas=hp.get("betas", (0.9, 0.999)), eps=hp.get("eps", 1e-8),
                              weight_decay=hp.get("weight_decay", 0.0),
                              amsgrad=hp.get("amsgrad", False),
                              maximize=hp.get("maximize", False),
                              decoupled=hp.get("decoupled", False))
        got, want = ours.params[i], ref_ps[i].detach()
        assert got.dtype == p0.dtype and got.shape == p0.shape
        assert float(ours.steps[i]) == n
        if p0.dtype == torch.float32:
            torch.testing.assert_close(got, want, **tol(torch.float32))
            torch.testing.assert_close(got.double(), oracle, **tol(torch.float32))
            st = ref_opt.state[ref_ps[i]]
            torch.testing.assert_close(ours.m[i], st["exp_avg"], **tol(torch.float32))
            torch.testing.assert_close(ours.v[i], st["exp_avg_sq"], **tol(torch.float32))
            if hp.get("amsgrad"):
                torch.testing.assert_close(ours.vmax[i], st["max_exp_avg_sq"],
                                           **tol(torch.float32))
        else:
            assert torch.isfinite(want).all(), "torch's own low-precision run must be finite"
            scale = p0.double().abs() + 4 * n * hp.get("lr", 1e-2)
            e_ours = ulp_error(got, oracle, p0.dtype, scale)
            e_torch = ulp_error(want, oracle, p0.dtype, scale)
            assert e_ours <= LOWP_ERR_RATIO * max(e_torch, LOWP_ERR_FLOOR_ULPS), (
                f"params[{i}] {tuple(p0.shape)}: error {e_ours:.2f} ulp vs torch's {e_torch:.2f}")


# ------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("shape_name", list(ADAM_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_shapes_match_torch_and_oracle(device, backend, dtype, shape_name):
    if shape_name == "many_small" and interpreted(device, backend):
        shapes = small_shapes(40)  # 200 launches per step would take 4 to 8 s here
    else:
        shapes = ADAM_SHAPES[shape_name]()
    n_steps = 2 if shape_name == "many_small" else 3
    params0 = rand_params(shapes, device, dtype)
    grads_seq = rand_grads(params0, n_steps)
    hp = dict(lr=1e-2, weight_decay=0.1, decoupled=True)
    ours = run_op(params0, grads_seq, backend, **hp)
    check_against_torch_and_oracle(ours, params0, grads_seq, hp)


FLAGS = {
    "plain": dict(),
    "l2": dict(weight_decay=0.1),
    "decoupled": dict(weight_decay=0.1, decoupled=True, lr_dtype=torch.float32),
    "amsgrad_l2": dict(amsgrad=True, weight_decay=0.1),
    "maximize_decoupled": dict(maximize=True, weight_decay=0.1, decoupled=True),
    "all": dict(amsgrad=True, maximize=True, weight_decay=0.05, decoupled=True,
                betas=(0.8, 0.99), eps=1e-6, lr=3e-2, lr_dtype=torch.float32),
}


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("dtype,state_dtype", STATE_CASES, ids=STATE_IDS)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_flags_match_torch_and_oracle(device, backend, dtype, state_dtype, flags):
    hp = dict(FLAGS[flags])
    lr_dtype = pop_lr_dtype(hp)
    if dtype == torch.float16:
        # as torch's own optimizer tests do for fp16 (common_optimizers.py): with L2 decay
        # g + wd * p can cancel, and torch's fp16 exp_avg_sq then underflows to 0 and
        # its denominator to 0 + eps(fp16) = 0
        hp["eps"] = 0.1
    params0 = rand_params([(4097,), (33, 7), ()], device, dtype)
    # grads that grow then shrink, so amsgrad's running max differs from exp_avg_sq
    grads_seq = rand_grads(params0, 3, scales=[1.0, 3.0, 0.1])
    ours = run_op(params0, grads_seq, backend, state_dtype=state_dtype, lr_dtype=lr_dtype, **hp)
    assert all(m.dtype == (state_dtype or dtype) for m in ours.m + ours.v + ours.vmax)
    check_against_torch_and_oracle(ours, params0, grads_seq, lr_as_given(hp, lr_dtype))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nonzero_initial_state(device, backend):
    """Resuming mid-training: random states and a step count of 7 (bias corrections at
    step 8), as after loading a checkpoint."""
    params0 = [torch.randn(s, device=device) for s in [(1000,), (5, 3)]]
    init = [{"step": torch.tensor(7.0), "exp_avg": torch.randn_like(p) * 0.1,
             "exp_avg_sq": torch.rand_like(p) * 0.01, "max_exp_avg_sq": torch.rand_like(p) * 0.02}
            for p in params0]
    state = SimpleNamespace(m=[s["exp_avg"].clone() for s in init],
                            v=[s["exp_avg_sq"].clone() for s in init],
                            vmax=[s["max_exp_avg_sq"].clone() for s in init],
                            steps=[s["step"].clone().to(device) for s in init])
    grads_seq = rand_grads(params0, 2)
    ours = run_op(params0, grads_seq, backend, amsgrad=True, weight_decay=0.01, state=state)
    ref_ps, ref_opt = run_torch(params0, grads_seq, amsgrad=True, weight_decay=0.01,
                                init_state=init)
    for i, p in enumerate(ref_ps):
        torch.testing.assert_close(ours.params[i], p.detach(), **tol(torch.float32))
        st = ref_opt.state[p]
        for mine, key in ((ours.m, "exp_avg"), (ours.v, "exp_avg_sq"),
                          (ours.vmax, "max_exp_avg_sq")):
            torch.testing.assert_close(mine[i], st[key], **tol(torch.float32))
        assert float(ours.steps[i]) == 9.0


def _bad_lists(device):
    """Each case breaks one list of an otherwise valid call; the error must name it."""
    def base():
        ps = [torch.randn(s, device=device) for s in [(6,), (2, 3)]]
        return dict(params=ps, grads=[torch.randn_like(p) for p in ps],
                    exp_avgs=[torch.zeros_like(p) for p in ps],
                    exp_avg_sqs=[torch.zeros_like(p) for p in ps], max_exp_avg_sqs=[],
                    master_params=[], state_steps=[torch.zeros((), device=device) for _ in ps])

    def short_grads(a):
        a["grads"] = a["grads"][:1]

    def state_shape(a):
        a["exp_avg_sqs"][1] = torch.zeros(6, device=device)

    def grad_dtype(a):
        a["grads"][0] = a["grads"][0].double()

    def short_steps(a):
        a["state_steps"] = a["state_steps"][:1]

    cases = {"grads_length": (short_grads, "grads"), "state_shape": (state_shape, "shape"),
             "grad_dtype": (grad_dtype, "grads"), "steps_length": (short_steps, "state_steps")}
    return base, cases


@pytest.mark.parametrize("case", ["grads_length", "state_shape", "grad_dtype", "steps_length"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_inconsistent_lists_refused(device, backend, case):
    """A malformed call is refused before anything is written (steps included)."""
    base, cases = _bad_lists(device)
    args = base()
    breaker, named = cases[case]
    breaker(args)
    mutable = ("params", "exp_avgs", "exp_avg_sqs", "state_steps")
    before = {k: [t.clone() for t in args[k]] for k in mutable}
    lr = torch.tensor(1e-3, dtype=torch.float64, device=device)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=named):
        op(args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"],
           args["max_exp_avg_sqs"], args["master_params"], args["state_steps"], lr, 0.9, 0.999,
           0.0, 1e-8, False, False, False, None, None, None, backend)
    for k in mutable:
        for a, b in zip(args[k], before[k]):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_lists(device, backend):
    op([], [], [], [], [], [], [], torch.tensor(1e-3, dtype=torch.float64), 0.9, 0.999, 0.0,
       1e-8, False, False, False, None, None, None, backend)


# ------------------------------------------------------------------- GradScaler args


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_scale_unscales(device, backend):
    params0 = rand_params([(4097,), (7, 9)], device)
    grads_seq = rand_grads(params0, 3)
    hp = dict(weight_decay=0.1, decoupled=True, amsgrad=True)
    # any scale but a power of two: as torch on the unscaled grads
    _, scaled = check_grad_scale_unscales(run_op, params0, grads_seq, backend, **hp)
    check_against_torch_and_oracle(scaled, params0, grads_seq, hp)


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_found_inf_skips_everything(device, backend, master):
    params0, masters = found_inf_inputs(device, master)
    sd = torch.float32
    state = SimpleNamespace(m=[torch.randn_like(p, dtype=sd) for p in params0],
                            v=[torch.rand_like(p, dtype=sd) for p in params0],
                            vmax=[torch.rand_like(p, dtype=sd) + 1 for p in params0],
                            steps=[torch.full((), 3.0, device=device) for _ in params0])
    grads = rand_grads(params0, 1)
    check_found_inf_skips_everything(run_op, params0, grads, backend, masters, state,
                                     amsgrad=True, weight_decay=0.1)


# -------------------------------------------------------------------- poisoned memory


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_views_into_poisoned_buffers(device, backend, dtype):
    """Every tensor the op reads or writes is a view into a NaN-filled buffer
    (optim_op_helpers.check_poisoned_views)."""
    p0 = rand_params([(4097,), (4097,)], device, dtype)
    check_poisoned_views(run_op, lambda ps: new_state(ps, amsgrad=True), backend, p0,
                         rand_grads(p0, 2), amsgrad=True, weight_decay=0.1)


# --------------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_master_weights(device, backend, dtype):
    """With fp32 masters the params are outputs only: poisoned with NaN before the first
    step, each step leaves param == master rounded to nearest, and the masters follow
    torch's fp32 Adam on the same (upcast) grads."""
    masters0, params = master_inputs(device, dtype)
    grads_seq = rand_grads(params, 3)
    hp = dict(weight_decay=0.1, decoupled=True)
    out = run_op(params, grads_seq, backend, masters=masters0, state_dtype=torch.float32, **hp)
    ref_ps, ref_opt = run_torch(masters0, [[g.float() for g in gs] for gs in grads_seq], **hp)
    for i, p in enumerate(ref_ps):
        torch.testing.assert_close(out.masters[i], p.detach(), **tol(torch.float32))
        torch.testing.assert_close(out.m[i], ref_opt.state[p]["exp_avg"], **tol(torch.float32))


# ---------------------------------------------------------------- stochastic rounding


def _sr_setup(device, shapes, steps=5.0):
    """bf16 params, fp32 states from the middle of training."""
    params0 = [torch.randn(s, device=device).to(torch.bfloat16) for s in shapes]
    init = [{"step": torch.tensor(steps, device=device),
             "exp_avg": 0.1 * torch.randn(s, device=device),
             "exp_avg_sq": 0.01 * torch.rand(s, device=device)} for s in shapes]
    return params0, init


def _sr_state(init):
    return SimpleNamespace(m=[s["exp_avg"].clone() for s in init],
                           v=[s["exp_avg_sq"].clone() for s in init], vmax=[],
                           steps=[s["step"].clone() for s in init])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_within_one_ulp_of_fp32_update(device, backend):
    shapes = [(4097,), (0,), (31, 3), ()]
    params0, init = _sr_setup(device, shapes)
    grads = rand_grads(params0, 1)
    hp = dict(lr=1e-3, weight_decay=0.1, decoupled=True)
    out = run_op(params0, grads, backend, state=_sr_state(init), sr_seed=sr_seed(device), **hp)
    ref_ps, _ = run_torch([p.float() for p in params0], [[g.float() for g in grads[0]]],
                          init_state=[{k: v.float() for k, v in s.items()} for s in init], **hp)
    assert_sr_within_one_ulp(out.params, ref_ps)
    # the fp32 states are exact fp32 updates, not rounded to bf16
    assert not torch.equal(out.m[0], out.m[0].bfloat16().float())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_unbiased(device, backend):
    """A fixed fp32 value rounded stochastically many times (65536 elements x 4 seeds):
    the mean approaches the value; round-to-nearest would be > 100 sigma away."""
    lr, p0, g = sr_unbiased_inputs(device)
    # the fp32 update, computed the way the kernels compute it
    value = float(run_torch([p0.float()], [[g.float()]], lr=lr)[0][0][0].detach())
    check_sr_unbiased(value, lambda seed: run_op([p0], [[g]], backend, lr=lr,
                                                 state_dtype=torch.float32,
                                                 sr_seed=seed).params[0],
                      device, q_margin=0.05)


@pytest.mark.parametrize("backend_a,backend_b", cpu_backend_pairs())
def test_sr_bits_agree_across_backends(backend_a, backend_b):
    """Same seed, same inputs: the backends draw the same random bits per (tensor,
    element), so the rounded bf16 bits agree on (nearly) every element."""
    shapes = [(4097,), (0,), (300, 7), (), (70001,)]
    params0, init = _sr_setup("cpu", shapes)
    grads = rand_grads(params0, 1)
    seed = sr_seed("cpu")
    check_sr_bits_agree(lambda be, sr: run_op(
        params0, grads, be, state=_sr_state(init), sr_seed=seed if sr else None,
        weight_decay=0.1, decoupled=True, lr=1e-3).params, backend_a, backend_b)


# --------------------------------------------------------------------------- opcheck


def _opcheck_samples(device, backend):
    def lists(shapes, dtype, state_dtype, amsgrad, master):
        ps = [torch.randn(s, device=device).to(dtype) for s in shapes]
        gs = [torch.randn(s, device=device).to(dtype) for s in shapes]
        ms = [torch.randn(s, device=device).to(state_dtype) * 0.1 for s in shapes]
        vs = [torch.rand(s, device=device).to(state_dtype) * 0.01 for s in shapes]
        vmax = [v.clone() for v in vs] if amsgrad else []
        masters = [p.float() for p in ps] if master else []
        steps = [torch.full((), 2.0, device=device) for _ in shapes]
        return [ps, gs, ms, vs, vmax, masters, steps]

    f64 = torch.tensor(1e-3, dtype=torch.float64, device=device)
    f32 = torch.tensor(1e-2, dtype=torch.float32, device=device)
    one = torch.tensor(1.0, device=device)
    return {
        "fp32": (*lists([(65,), (3, 4)], torch.float32, torch.float32, False, False),
                 f64, 0.9, 0.999, 0.0, 1e-8, False, False, False, None, None, None, backend),
        "bf16_master_amsgrad_scaler": (
            *lists([(65,), ()], torch.bfloat16, torch.float32, True, True), f32, 0.9, 0.99,
            0.1, 1e-8, True, False, True, torch.tensor(4.0, device=device), 0 * one, None,
            backend),
        "bf16_sr_maximize": (
            *lists([(65,), (2, 3)], torch.bfloat16, torch.float32, False, False), f64, 0.9,
            0.999, 0.1, 1e-8, False, True, False, None, None,
            torch.tensor(1234, dtype=torch.int64, device=device), backend),
        "fp16_states_fp16": (
            *lists([(65,)], torch.float16, torch.float16, True, False), f64, 0.9, 0.999, 0.1,
            1e-6, True, False, False, None, None, None, backend),
    }


@pytest.mark.parametrize("sample", ["fp32", "bf16_master_amsgrad_scaler", "bf16_sr_maximize",
                                    "fp16_states_fp16"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend, sample):
    args = _opcheck_samples(device, backend)[sample]
    torch.library.opcheck(torch.ops.dlopt.adam_step.default, args)
