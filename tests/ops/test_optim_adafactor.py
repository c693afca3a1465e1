"""torch.ops.dlopt.adafactor_step, per backend: against torch.optim.Adafactor (same
dtype) and the float64 oracle (tests/reference.py adafactor_float64), over dtypes, odd
shapes (factored 2-D and batched 3-D params, vectors, 0-dim, zero-size), every flag,
the second-moment states, master weights, stochastic rounding, GradScaler arguments,
NaN-poisoned memory, non-contiguous params and grads, and torch.library.opcheck.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from optim_op_helpers import (DEVICE_BACKENDS, DTYPES, assert_fp32_close, assert_lowp_close,
                              assert_sr_within_one_ulp, check_found_inf_skips_everything,
                              check_grad_scale_unscales, check_poisoned_views, check_sr_bits_agree,
                              check_sr_unbiased, cpu_backend_pairs, dtype_id, found_inf_inputs,
                              interpreted, master_inputs, pop_lr_dtype, rand_params, run_op_steps,
                              small_shapes, sr_seed, sr_unbiased_inputs)
from reference import adafactor_float64

op = torch.ops.dlopt.adafactor_step


def new_state(params, state_dtype=None):
    """torch's layout: row_var / col_var per >= 2-D param, variance per 0-/1-D param."""
    sd = lambda p: state_dtype or p.dtype  # noqa: E731
    fac = [p for p in params if p.dim() >= 2]
    return SimpleNamespace(
        rv=[torch.zeros((*p.shape[:-1], 1), dtype=sd(p), device=p.device) for p in fac],
        cv=[torch.zeros((*p.shape[:-2], 1, p.shape[-1]), dtype=sd(p), device=p.device)
            for p in fac],
        var=[torch.zeros_like(p, dtype=sd(p)) for p in params if p.dim() < 2],
        steps=[torch.zeros((), dtype=torch.float32, device=p.device) for p in params])


def run_op(params, grads_seq, backend, *, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
           weight_decay=0.0, maximize=False, state_dtype=None, masters=None, sr_seed=None,
           grad_scale=None, found_inf=None, lr_dtype=torch.float64, state=None, clone=True):
    """len(grads_seq) op calls (optim_op_helpers.run_op_steps); eps1=None is the first
    param's dtype's epsilon, as torch resolves it."""
    state = new_state(params, state_dtype) if state is None else state
    eps1 = torch.finfo(params[0].dtype).eps if eps[0] is None else eps[0]

    def step(k, ps, grads, st, ms, lr_t):
        op(ps, grads, st.rv, st.cv, st.var, ms, st.steps, lr_t, beta2_decay, eps1, eps[1], d,
           weight_decay, maximize, grad_scale, found_inf, sr_seed, backend)

    return run_op_steps(step, params, grads_seq, state, masters=masters, lr=lr,
                        lr_dtype=lr_dtype, found_inf=found_inf, clone=clone)


def hp_torch(hp):
    return {k: v for k, v in hp.items() if k in ("lr", "beta2_decay", "eps", "d",
                                                 "weight_decay", "maximize")}


def run_torch(params, grads_seq, hp):
    """torch.optim.Adafactor (for-loop implementation) on clones of the non-empty params
    (torch divides by zero on a zero-size param); None stands in for those."""
    ps = [torch.nn.Parameter(p.detach().clone()) if p.numel() else None for p in params]
    live = [p for p in ps if p is not None]
    opt = torch.optim.Adafactor(live, **hp_torch(hp), foreach=False) if live else None
    for grads in grads_seq:
        for p, g in zip(ps, grads):
            if p is not None:
                p.grad = g.clone()
        if opt is not None:
            opt.step()
    return ps, opt


def factored_states(ours):
    """Per param index: ours' states in torch's key names."""
    out, kf, kv = [], 0, 0
    for p in ours.params:
        if p.dim() >= 2:
            out.append({"row_var": ours.rv[kf], "col_var": ours.cv[kf]})
            kf += 1
        else:
            out.append({"variance": ours.var[kv]})
            kv += 1
    return out


def check_against_torch_and_oracle(ours, params0, grads_seq, hp):
    """fp32: params and states ~ torch and ~ the float64 oracle within the fp32 row of
    the table. bf16/fp16: ours' error vs the oracle (ulps at the trajectory's scale) at
    most LOWP_ERR_RATIO x torch's own at the same precision."""
    ref_ps, ref_opt = run_torch(params0, grads_seq, hp)
    n = len(grads_seq)
    kw = dict(lr=hp.get("lr", 1e-2), beta2_decay=hp.get("beta2_decay", -0.8),
              eps1=hp.get("eps", (None, 1e-3))[0], eps2=hp.get("eps", (None, 1e-3))[1],
              d=hp.get("d", 1.0), weight_decay=hp.get("weight_decay", 0.0),
              maximize=hp.get("maximize", False))
    states = factored_states(ours)
    for i, p0 in enumerate(params0):
        got = ours.params[i]
        assert got.dtype == p0.dtype and got.shape == p0.shape
        assert float(ours.steps[i]) == n
        gs = [g[i] for g in grads_seq]
        oracle, R, C, V, scale = adafactor_float64(p0, gs, **kw, trajectory_scale=True)
        oracle_states = {"row_var": R, "col_var": C, "variance": V}
        if p0.numel() == 0:  # only the step moves
            for t in states[i].values():
                assert not t.any()
            continue
        want, want_state = ref_ps[i].detach(), ref_opt.state[ref_ps[i]]
        if p0.dtype == torch.float32:
            assert_fp32_close(got, want)
            assert_fp32_close(got.double(), oracle)
            for key, t in states[i].items():
                assert_fp32_close(t, want_state[key])
                assert_fp32_close(t.double(), oracle_states[key])
            continue
        assert_lowp_close(got, want, oracle, scale)
        for key, t in states[i].items():
            if t.dtype == torch.float32:  # fp32 states (of the grads only): ~ the oracle
                assert_fp32_close(t.double(), oracle_states[key])
            else:
                assert_lowp_close(t, want_state[key], oracle_states[key],
                                  oracle_states[key].abs(), what=key)


def rand_grads(params, n_steps, scale=1.0):
    return [[(torch.randn(p.shape, device=p.device) * scale).to(p.dtype) for p in params]
            for _ in range(n_steps)]


SHAPES = {
    "1": [(1,)],
    "4097": [(4097,)],
    "0dim": [()],
    "zero_size": [(0,), (3, 0), (2, 0, 5)],
    "matrix": [(33, 7)],
    "batched": [(2, 5, 6), (2, 1, 3, 4)],
    "row_col": [(1, 300), (300, 1)],
    "big_matrix": [(257, 273)],
    "many_small": None,
}


def shapes_for(name, device, backend):
    if name == "many_small":
        return small_shapes(12 if interpreted(device, backend) else 60)
    return SHAPES[name]


# ------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_shapes_match_torch_and_oracle(device, backend, dtype, shape_name):
    shapes = shapes_for(shape_name, device, backend)
    n_steps = 2 if shape_name == "many_small" else 3
    params0 = rand_params(shapes, device, dtype)
    grads_seq = rand_grads(params0, n_steps)
    hp = dict(lr=1e-2, weight_decay=0.1)
    ours = run_op(params0, grads_seq, backend, **hp)
    check_against_torch_and_oracle(ours, params0, grads_seq, hp)


FLAGS = {
    "default": dict(),
    "maximize_wd": dict(maximize=True, weight_decay=0.1, lr_dtype=torch.float32),
    "beta2_decay": dict(beta2_decay=-1.0, lr=0.05),
    "clip_d_eps": dict(d=1.5, eps=(1e-3, 1e-2), lr=0.02),
    "large_steps": dict(eps=(1e-3, 0.5), lr=0.3, beta2_decay=-0.5),
}
STATE_CASES = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32),
               (torch.float16, None)]


# every flag in fp32, every storage case with one flag set (the maths does not depend on
# the storage, and the interpreter is slow)
FLAG_CASES = ([(f, torch.float32, None) for f in FLAGS]
              + [("maximize_wd", d, s) for d, s in STATE_CASES[1:]])


@pytest.mark.parametrize("flags,dtype,state_dtype", FLAG_CASES,
                         ids=[f"{f}-{dtype_id(d)}-state_{dtype_id(s) if s else 'same'}"
                              for f, d, s in FLAG_CASES])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_flags_match_torch_and_oracle(device, backend, dtype, state_dtype, flags):
    hp = dict(FLAGS[flags])
    lr_dtype = pop_lr_dtype(hp)
    params0 = rand_params([(65, 31), (4097,), (), (3, 4, 5)], device, dtype)
    grads_seq = rand_grads(params0, 3)
    ours = run_op(params0, grads_seq, backend, state_dtype=state_dtype, lr_dtype=lr_dtype, **hp)
    check_against_torch_and_oracle(ours, params0, grads_seq, hp)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_mid_training_state(device, backend):
    """From torch's state after 3 steps (step 3, non-zero factors), ours' next 2 steps
    match torch's."""
    shapes = [(40, 30), (17,), (2, 3, 9)]
    params0 = [torch.randn(s, device=device) for s in shapes]
    ref_ps, ref_opt = run_torch(params0, rand_grads(params0, 3), dict(weight_decay=0.1))
    st = [ref_opt.state[p] for p in ref_ps]
    state = SimpleNamespace(rv=[s["row_var"].clone() for s in st if "row_var" in s],
                            cv=[s["col_var"].clone() for s in st if "col_var" in s],
                            var=[s["variance"].clone() for s in st if "variance" in s],
                            # torch keeps steps on the CPU; the op takes them on the
                            # params' device (the cuda backend refuses CPU ones)
                            steps=[s["step"].clone().to(device) for s in st])
    start = [p.detach().clone() for p in ref_ps]
    grads_seq = rand_grads(params0, 2)
    ours = run_op(start, grads_seq, backend, weight_decay=0.1, state=state)
    for grads in grads_seq:
        for p, g in zip(ref_ps, grads):
            p.grad = g.clone()
        ref_opt.step()
    for i, p in enumerate(ref_ps):
        assert_fp32_close(ours.params[i], p.detach())
        for key, t in factored_states(ours)[i].items():
            assert_fp32_close(t, ref_opt.state[p][key])
    assert float(ours.steps[0]) == 5.0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_param_and_grads(device, backend):
    """A transposed param (with transposed factors), a transposed grad and a strided
    vector: the same result as contiguous copies (rows and columns are the logical
    last two dims, whatever the memory layout)."""
    p0 = [torch.randn(37, 53, device=device), torch.randn(29, 41, device=device),
          torch.randn(99, device=device)]
    grads_seq = rand_grads(p0, 2)
    plain = run_op(p0, grads_seq, backend, weight_decay=0.1)
    params = [p0[0].clone(), p0[1].t().contiguous().t(), torch.randn(198, device=device)[::2]]
    params[2].copy_(p0[2])
    state = new_state(params)
    tgrads = [[g[0].t().contiguous().t(), g[1].contiguous(), g[2]] for g in grads_seq]
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    eps1 = torch.finfo(torch.float32).eps
    for gs in tgrads:
        op(params, gs, state.rv, state.cv, state.var, [], state.steps, lr, -0.8, eps1, 1e-3, 1.0,
           0.1, False, None, None, None, backend)
    for a, b in zip(params + state.rv + state.cv + state.var,
                    plain.params + plain.rv + plain.cv + plain.var):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_grad_propagates_like_torch(device, backend):
    """A NaN in a grad spreads as in torch: through the factors and their mean to the
    whole factored param; to its one element of a vector param (Python's max(1, nan)
    is 1, so the update's NaN RMS does not clip the others)."""
    params0 = [torch.randn(9, 7, device=device), torch.randn(50, device=device)]
    grads = rand_grads(params0, 1)
    grads[0][0][2, 3] = float("nan")
    grads[0][1][5] = float("nan")
    ours = run_op(params0, grads, backend)
    ref_ps, _ = run_torch(params0, grads, {})
    for a, b in zip(ours.params, ref_ps):
        assert torch.equal(a.isnan(), b.detach().isnan())
        assert_fp32_close(a[~a.isnan()], b.detach()[~a.isnan()])
    assert ours.params[0].isnan().all() and int(ours.params[1].isnan().sum()) == 1


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_lists(device, backend):
    op([], [], [], [], [], [], [], torch.tensor(1e-2, dtype=torch.float64), -0.8, 1e-7, 1e-3, 1.0,
       0.0, False, None, None, None, backend)


# ------------------------------------------------------------------- GradScaler args


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_scale_unscales(device, backend):
    params0 = rand_params([(31, 9), (4097,), (2, 3, 4)], device)
    grads_seq = rand_grads(params0, 3)
    hp = dict(weight_decay=0.1, maximize=True)
    _, scaled = check_grad_scale_unscales(run_op, params0, grads_seq, backend, **hp)
    check_against_torch_and_oracle(scaled, params0, grads_seq, hp)


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_found_inf_skips_everything(device, backend, master):
    params0, masters = found_inf_inputs(device, master, shapes=[(33, 5), (4097,), (), (0,)])
    state = new_state(params0, torch.float32)
    for t in state.rv + state.cv + state.var:
        t.uniform_(0.5, 1.5)
    for s in state.steps:
        s.fill_(3.0)
    grads = rand_grads(params0, 1)
    check_found_inf_skips_everything(run_op, params0, grads, backend, masters, state,
                                     weight_decay=0.1)


# -------------------------------------------------------------------- poisoned memory


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_views_into_poisoned_buffers(device, backend, dtype):
    """Params, grads and the factored states are views into NaN-filled buffers
    (optim_op_helpers.check_poisoned_views; no strided param: the factors are per row
    and column of a dense layout)."""
    p0 = rand_params([(41, 23), (4097,)], device, dtype)
    check_poisoned_views(run_op, new_state, backend, p0, rand_grads(p0, 2), strided=False,
                         weight_decay=0.1)


# --------------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_master_weights(device, backend, dtype):
    """With fp32 masters the params are outputs only (NaN before the first step), equal
    to the masters rounded after each step; the masters follow torch's fp32 Adafactor
    with eps1 of the param dtype."""
    masters0, params = master_inputs(device, dtype, [(33, 9), (4097,), (), (0,), (2, 3, 4)])
    grads_seq = rand_grads(params, 3)
    out = run_op(params, grads_seq, backend, masters=masters0, state=new_state(masters0),
                 weight_decay=0.1)
    hp = dict(weight_decay=0.1, eps=(torch.finfo(dtype).eps, 1e-3))
    ref_ps, ref_opt = run_torch(masters0, [[g.float() for g in gs] for gs in grads_seq], hp)
    for i, p in enumerate(ref_ps):
        if p is not None:
            assert_fp32_close(out.masters[i], p.detach())


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_within_one_ulp_of_fp32_update(device, backend):
    shapes = [(65, 63), (0,), (4097,), ()]
    params0 = rand_params(shapes, device, torch.bfloat16)
    grads = rand_grads(params0, 1)
    eps = (torch.finfo(torch.bfloat16).eps, 1e-3)
    out = run_op(params0, grads, backend, sr_seed=sr_seed(device), state_dtype=torch.float32,
                 eps=eps, weight_decay=0.1)
    ref_ps, _ = run_torch([p.float() for p in params0], [[g.float() for g in grads[0]]],
                          dict(eps=eps, weight_decay=0.1))
    live = [(got, want) for got, want in zip(out.params, ref_ps) if want is not None]
    assert_sr_within_one_ulp(*zip(*live))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sr_unbiased(device, backend):
    """A vector of ones with unit grads moves every element by the same fp32 amount;
    stochastic rounding over 65536 elements x 4 seeds averages to it."""
    lr, p0, g = sr_unbiased_inputs(device)
    eps = (torch.finfo(torch.bfloat16).eps, 1e-3)
    value = float(run_torch([p0.float()], [[g.float()]], dict(lr=lr, eps=eps))[0][0].detach()[0])
    check_sr_unbiased(value, lambda seed: run_op([p0], [[g]], backend, lr=lr, eps=eps,
                                                 state_dtype=torch.float32,
                                                 sr_seed=seed).params[0],
                      device, q_margin=0.02)


@pytest.mark.parametrize("backend_a,backend_b", cpu_backend_pairs())
def test_sr_bits_agree_across_backends(backend_a, backend_b):
    shapes = [(300, 7), (0,), (4097,), (), (2, 40, 50)]
    params0 = rand_params(shapes, "cpu", torch.bfloat16)
    grads = rand_grads(params0, 1)
    seed = sr_seed("cpu")
    check_sr_bits_agree(lambda be, sr: run_op(
        params0, grads, be, state_dtype=torch.float32, sr_seed=seed if sr else None,
        weight_decay=0.1).params, backend_a, backend_b)


# --------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_mismatched_lists_refused(device, backend):
    p = [torch.randn(5, 4, device=device), torch.randn(3, device=device)]
    g = [torch.randn_like(t) for t in p]
    st = new_state(p)
    lr = torch.tensor(1e-3, dtype=torch.float64, device=device)
    before = [t.clone() for t in p + st.rv + st.cv + st.var + st.steps]
    bad = {
        "no row_vars": (st.rv[:0], st.cv, st.var),
        "row_var shape": ([torch.zeros(4, 1, device=device)], st.cv, st.var),
        "col_var shape": (st.rv, [torch.zeros(5, 1, device=device)], st.var),
        "extra variance": (st.rv, st.cv, st.var + [torch.zeros(3, device=device)]),
        "variance dtype": (st.rv, st.cv, [st.var[0].double()]),
    }
    for what, (rv, cv, var) in bad.items():
        with pytest.raises((RuntimeError, ValueError, TypeError)):
            op(p, g, rv, cv, var, [], st.steps, lr, -0.8, 1e-7, 1e-3, 1.0, 0.0, False, None, None,
               None, backend)
        for a, b in zip(p + st.rv + st.cv + st.var + st.steps, before):
            assert torch.equal(a, b), what


# --------------------------------------------------------------------------- opcheck


def _opcheck_samples(device, backend):
    def lists(shapes, dtype, state_dtype, master):
        ps = [torch.randn(s, device=device).to(dtype) for s in shapes]
        gs = [torch.randn(s, device=device).to(dtype) for s in shapes]
        st = new_state(ps, state_dtype)
        for t in st.rv + st.cv + st.var:
            t.uniform_(0.1, 1.0)
        for s in st.steps:
            s.fill_(2.0)
        masters = [p.float() for p in ps] if master else []
        return [ps, gs, st.rv, st.cv, st.var, masters, st.steps]

    f64 = torch.tensor(1e-2, dtype=torch.float64, device=device)
    f32 = torch.tensor(1e-2, dtype=torch.float32, device=device)
    return {
        "fp32": (*lists([(9, 7), (65,), ()], torch.float32, torch.float32, False), f64, -0.8,
                 1e-7, 1e-3, 1.0, 0.0, False, None, None, None, backend),
        "bf16_master_scaler": (*lists([(5, 6), (2, 3, 4), (7,)], torch.bfloat16, torch.float32,
                                      True), f32, -0.8, 1e-2, 1e-3, 1.0, 0.1, False,
                               torch.tensor(4.0, device=device), torch.tensor(0.0, device=device),
                               None, backend),
        "bf16_sr_maximize": (*lists([(6, 5), (11,)], torch.bfloat16, torch.float32, False), f64,
                             -1.0, 1e-2, 1e-3, 1.5, 0.1, True, None, None,
                             torch.tensor(1234, dtype=torch.int64, device=device), backend),
        "fp16_states_fp16": (*lists([(8, 3), (5,)], torch.float16, torch.float16, False), f64,
                             -0.8, 1e-3, 1e-3, 1.0, 0.1, False, None, None, None, backend),
    }


@pytest.mark.parametrize("sample", ["fp32", "bf16_master_scaler", "bf16_sr_maximize",
                                    "fp16_states_fp16"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend, sample):
    args = _opcheck_samples(device, backend)[sample]
    torch.library.opcheck(torch.ops.dlopt.adafactor_step.default, args)
