"""torch.ops.dlopt.adam_step, per backend: against torch.optim.Adam (same dtype) and the
float64 oracle (tests/reference.py), over dtypes, odd shapes and every flag; master
weights, stochastic rounding, GradScaler arguments, poisoned memory around the
tensors it writes, and torch.library.opcheck.

Tolerances come from tests/tolerances.py only. Inputs are fresh random every run
(tests/conftest.py seeds torch per test; DLOPT_TEST_SEED=<n> fixes the seed).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import device_backends
from reference import adam_float64
from tolerances import (LOWP_ERR_FLOOR_ULPS, LOWP_ERR_RATIO, SR_BIT_AGREEMENT, SR_MAX_ULPS,
                        SR_MEAN_SIGMAS, spacing, tol, ulp_error)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE_BACKENDS = device_backends()
SR_DEVICE_BACKENDS = DEVICE_BACKENDS  # every backend implements bf16 stochastic rounding
op = torch.ops.dlopt.adam_step


def _id(x):
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return None


def small_shapes(n: int) -> list[tuple]:
    """n small shapes (1-D and 2-D, 1..64 elements per dim) with a 0-dim and a zero-size
    tensor among them, so per-tensor indexing past skipped tensors is exercised."""
    dims = torch.randint(1, 65, (n, 2)).tolist()
    two_d = torch.rand(n).lt(0.5).tolist()
    shapes = [tuple(d) if t else (d[0],) for d, t in zip(dims, two_d)]
    shapes[n // 3] = ()
    shapes[2 * n // 3] = (0,)
    return shapes


SHAPES = {
    "1": lambda: [(1,)],
    "4097": lambda: [(4097,)],
    "278011": lambda: [(278011,)],
    "many_small": lambda: small_shapes(200),
    "0dim": lambda: [()],
    "zero_size": lambda: [(0,), (3, 0, 2)],
}


def interpreted(device, backend):
    """Triton under TRITON_INTERPRET pays ~20 ms per launch (one per tensor)."""
    return backend == "triton" and device == "cpu"


def rand_grads(params, n_steps, *, scales=None):
    """Fresh grads per step. For fp16 params the magnitudes are kept >= 0.25 (times the
    step's scale): torch's own fp16 path, our yardstick, keeps exp_avg_sq in fp16, where
    (1 - beta2) * g^2 underflows for small g, and adds eps in fp16, where 1e-8 is 0."""
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


def run_op(params, grads_seq, backend, *, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
           weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False, state_dtype=None,
           masters=None, sr_seed=None, grad_scale=None, found_inf=None,
           lr_dtype=torch.float64, state=None):
    """Run len(grads_seq) op calls on clones of `params`; returns every tensor it owns."""
    params = [p.clone() for p in params]
    if state is None:
        sd = lambda p: state_dtype or p.dtype  # noqa: E731
        state = SimpleNamespace(
            m=[torch.zeros_like(p, dtype=sd(p)) for p in params],
            v=[torch.zeros_like(p, dtype=sd(p)) for p in params],
            vmax=[torch.zeros_like(p, dtype=sd(p)) for p in params] if amsgrad else [],
            steps=[torch.zeros((), dtype=torch.float32, device=p.device) for p in params])
    masters = [] if masters is None else [m.clone() for m in masters]
    lr_t = torch.tensor(lr, dtype=lr_dtype, device=params[0].device if params else "cpu")
    for grads in grads_seq:
        snapshot = [g.clone() for g in grads]
        op(params, grads, state.m, state.v, state.vmax, masters, state.steps, lr_t, betas[0],
           betas[1], weight_decay, eps, amsgrad, maximize, decoupled, grad_scale, found_inf,
           sr_seed, backend)
        for g, s in zip(grads, snapshot):  # grads are read-only
            assert torch.equal(g, s) or (g.isnan().any() and torch.equal(g.isnan(), s.isnan()))
    return SimpleNamespace(params=params, masters=masters, **vars(state))


def run_torch(params, grads_seq, *, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
              amsgrad=False, maximize=False, decoupled=False, init_state=None):
    """torch.optim.Adam (for-loop implementation) on clones of `params`."""
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    opt = torch.optim.Adam(ps, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                           amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled,
                           foreach=False)
    if init_state is not None:
        for p, st in zip(ps, init_state):
            opt.state[p] = {k: v.clone() for k, v in st.items()}
    for grads in grads_seq:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    return ps, opt


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


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_shapes_match_torch_and_oracle(device, backend, dtype, shape_name):
    if shape_name == "many_small" and interpreted(device, backend):
        shapes = small_shapes(40)  # 200 launches per step would take 4 to 8 s here
    else:
        shapes = SHAPES[shape_name]()
    n_steps = 2 if shape_name == "many_small" else 3
    params0 = [torch.randn(s, device=device).to(dtype) for s in shapes]
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
STATE_CASES = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32),
               (torch.float16, None), (torch.float16, torch.float32)]


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("dtype,state_dtype", STATE_CASES,
                         ids=[f"{_id(d)}-state_{_id(s) if s else 'same'}" for d, s in STATE_CASES])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_flags_match_torch_and_oracle(device, backend, dtype, state_dtype, flags):
    hp = dict(FLAGS[flags])
    lr_dtype = hp.pop("lr_dtype", torch.float64)
    if dtype == torch.float16:
        # as torch's own optimizer tests do for fp16 (common_optimizers.py): with L2 decay
        # g + wd * p can cancel, and torch's fp16 exp_avg_sq then underflows to 0 and
        # its denominator to 0 + eps(fp16) = 0
        hp["eps"] = 0.1
    params0 = [torch.randn(s, device=device).to(dtype) for s in [(4097,), (33, 7), ()]]
    # grads that grow then shrink, so amsgrad's running max differs from exp_avg_sq
    grads_seq = rand_grads(params0, 3, scales=[1.0, 3.0, 0.1])
    ours = run_op(params0, grads_seq, backend, state_dtype=state_dtype, lr_dtype=lr_dtype, **hp)
    assert all(m.dtype == (state_dtype or dtype) for m in ours.m + ours.v + ours.vmax)
    if lr_dtype == torch.float32:  # torch gets the lr value our kernel was given
        hp["lr"] = float(torch.tensor(hp.get("lr", 1e-2), dtype=torch.float32))
    check_against_torch_and_oracle(ours, params0, grads_seq, hp)


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
    params0 = [torch.randn(s, device=device) for s in [(4097,), (7, 9)]]
    grads_seq = rand_grads(params0, 3)
    hp = dict(weight_decay=0.1, decoupled=True, amsgrad=True)
    plain = run_op(params0, grads_seq, backend, **hp)
    # a power-of-two scale divides exactly: bit-identical to the unscaled step
    s = 2.0**12
    scaled = run_op(params0, [[g * s for g in gs] for gs in grads_seq], backend, **hp,
                    grad_scale=torch.tensor(s, device=device))
    for a, b in zip(plain.params + plain.m + plain.v, scaled.params + scaled.m + scaled.v):
        assert torch.equal(a, b)
    # any other scale: as torch on the unscaled grads
    s = 1000.5
    scaled = run_op(params0, [[g * s for g in gs] for gs in grads_seq], backend, **hp,
                    grad_scale=torch.tensor(s, device=device))
    check_against_torch_and_oracle(scaled, params0, grads_seq, hp)


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_found_inf_skips_everything(device, backend, master):
    dtype = torch.bfloat16 if master else torch.float32
    params0 = [torch.randn(s, device=device).to(dtype) for s in [(4097,), (), (0,)]]
    masters = [p.float() + 1e-3 * torch.randn_like(p.float()) for p in params0] if master else None
    sd = torch.float32
    state = SimpleNamespace(m=[torch.randn_like(p, dtype=sd) for p in params0],
                            v=[torch.rand_like(p, dtype=sd) for p in params0],
                            vmax=[torch.rand_like(p, dtype=sd) + 1 for p in params0],
                            steps=[torch.full((), 3.0, device=device) for _ in params0])
    before = [t.clone() for t in state.m + state.v + state.vmax + state.steps]
    grads = rand_grads(params0, 1)
    out = run_op(params0, grads, backend, amsgrad=True, weight_decay=0.1, masters=masters,
                 state=state, found_inf=torch.tensor(1.0, device=device))
    for a, b in zip(out.params, params0):
        assert torch.equal(a, b)
    for a, b in zip(out.m + out.v + out.vmax + out.steps, before):
        assert torch.equal(a, b)
    for a, b in zip(out.masters, masters or []):
        assert torch.equal(a, b)
    # found_inf == 0 is a normal step
    state_copy = SimpleNamespace(**{k: [t.clone() for t in v] for k, v in vars(state).items()})
    run_fi = run_op(params0, grads, backend, masters=masters, state=state_copy, amsgrad=True,
                    weight_decay=0.1, found_inf=torch.tensor(0.0, device=device))
    run_no = run_op(params0, grads, backend, masters=masters, state=state, amsgrad=True,
                    weight_decay=0.1)
    for a, b in zip(run_fi.params + run_fi.m + run_fi.steps,
                    run_no.params + run_no.m + run_no.steps):
        assert torch.equal(a, b)
    assert float(run_no.steps[0]) == 4.0


# -------------------------------------------------------------------- poisoned memory


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_views_into_poisoned_buffers(device, backend, dtype):
    """Every tensor the op reads or writes is a view into a NaN-filled buffer: the op
    must neither read the NaNs (results equal a run on clean copies) nor write outside
    the views (the poison is bit for bit unchanged). One param is a strided view."""
    n, pad = 4097, 17

    def embed(t):  # a view of t inside a NaN buffer: [pad NaN | t | pad NaN]
        buf = torch.full((t.numel() + 2 * pad,), float("nan"), dtype=t.dtype, device=device)
        buf[pad:pad + t.numel()] = t.reshape(-1)
        return buf, buf[pad:pad + t.numel()].view(t.shape)

    def embed_strided(t):  # every other element of a NaN buffer
        buf = torch.full((2 * t.numel() + 1,), float("nan"), dtype=t.dtype, device=device)
        view = buf[1::2]
        view.copy_(t)
        return buf, view

    p0 = [torch.randn(n, device=device).to(dtype), torch.randn(n, device=device).to(dtype)]
    grads_seq = rand_grads(p0, 2)
    clean = run_op(p0, grads_seq, backend, amsgrad=True, weight_decay=0.1)

    bufs, views = [], {}
    for name, ts in (("p", p0), ("m", [torch.zeros_like(p) for p in p0]),
                     ("v", [torch.zeros_like(p) for p in p0]),
                     ("vmax", [torch.zeros_like(p) for p in p0])):
        views[name] = []
        for i, t in enumerate(ts):
            b, v = (embed_strided if (name == "p" and i == 1) else embed)(t)
            bufs.append((b, v, b.clone()))
            views[name].append(v)
    poisoned_grads = []
    for gs in grads_seq:
        row = []
        for g in gs:
            b, v = embed(g)
            bufs.append((b, v, b.clone()))
            row.append(v)
        poisoned_grads.append(row)
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    steps = [torch.zeros((), device=device) for _ in p0]
    for gs in poisoned_grads:
        op(views["p"], gs, views["m"], views["v"], views["vmax"], [], steps, lr, 0.9, 0.999, 0.1,
           1e-8, True, False, False, None, None, None, backend)
    for a, b in zip(views["p"] + views["m"] + views["v"] + views["vmax"],
                    clean.params + clean.m + clean.v + clean.vmax):
        assert torch.equal(a, b)
    ibits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    for buf, view, orig in bufs:
        outside = torch.ones(buf.numel(), dtype=torch.bool, device=device)
        first, stride = view.storage_offset(), view.stride(0)
        outside[first:first + stride * (view.numel() - 1) + 1:stride] = False
        bits = ibits[buf.dtype]
        assert torch.equal(buf.view(bits)[outside], orig.view(bits)[outside])


# --------------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_master_weights(device, backend, dtype):
    """With fp32 masters the params are outputs only: poisoned with NaN before the first
    step, each step leaves param == master rounded to nearest, and the masters follow
    torch's fp32 Adam on the same (upcast) grads."""
    shapes = [(4097,), (13, 5), (), (0,)]
    masters0 = [torch.randn(s, device=device) for s in shapes]
    params = [torch.full(s, float("nan"), device=device, dtype=dtype) for s in shapes]
    state = SimpleNamespace(m=[torch.zeros_like(m) for m in masters0],
                            v=[torch.zeros_like(m) for m in masters0], vmax=[],
                            steps=[torch.zeros((), device=device) for _ in shapes])
    masters = [m.clone() for m in masters0]
    grads_seq = rand_grads(params, 3)
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    for gs in grads_seq:
        op(params, gs, state.m, state.v, [], masters, state.steps, lr, 0.9, 0.999, 0.1, 1e-8,
           False, False, True, None, None, None, backend)
        for p, m in zip(params, masters):
            assert torch.equal(p, m.to(dtype))
    ref_ps, ref_opt = run_torch(masters0, [[g.float() for g in gs] for gs in grads_seq],
                                weight_decay=0.1, decoupled=True)
    for i, p in enumerate(ref_ps):
        torch.testing.assert_close(masters[i], p.detach(), **tol(torch.float32))
        torch.testing.assert_close(state.m[i], ref_opt.state[p]["exp_avg"], **tol(torch.float32))


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


@pytest.mark.parametrize("device,backend", SR_DEVICE_BACKENDS)
def test_sr_within_one_ulp_of_fp32_update(device, backend):
    shapes = [(4097,), (0,), (31, 3), ()]
    params0, init = _sr_setup(device, shapes)
    grads = rand_grads(params0, 1)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
    out = run_op(params0, grads, backend, state=_sr_state(init), sr_seed=seed, lr=1e-3,
                 weight_decay=0.1, decoupled=True)
    ref_ps, _ = run_torch([p.float() for p in params0], [[g.float() for g in grads[0]]],
                          lr=1e-3, weight_decay=0.1, decoupled=True,
                          init_state=[{k: v.float() for k, v in s.items()} for s in init])
    rtol, atol = tol(torch.float32).values()
    for got, want in zip(out.params, ref_ps):
        want = want.detach().double()
        assert got.dtype == torch.bfloat16
        bound = SR_MAX_ULPS * spacing(torch.bfloat16, want) + atol + rtol * want.abs()
        assert ((got.double() - want).abs() <= bound).all()
    # the fp32 states are exact fp32 updates, not rounded to bf16
    assert not torch.equal(out.m[0], out.m[0].bfloat16().float())


@pytest.mark.parametrize("device,backend", SR_DEVICE_BACKENDS)
def test_sr_unbiased(device, backend):
    """A fixed fp32 value rounded stochastically many times (65536 elements x 4 seeds):
    the mean approaches the value; round-to-nearest would be > 100 sigma away."""
    n, n_seeds = 65536, 4
    lr = float(torch.empty(()).uniform_(0.5e-3, 3.5e-3))
    p0 = torch.ones(n, dtype=torch.bfloat16, device=device)
    g = torch.ones(n, dtype=torch.bfloat16, device=device)
    # the fp32 update, computed the way the kernels compute it
    value = float(run_torch([p0.float()], [[g.float()]], lr=lr)[0][0][0].detach())
    lo = float(torch.tensor(value).bfloat16().float())
    if lo > value:
        lo -= float(spacing(torch.bfloat16, torch.tensor(value)))
    ulp = float(spacing(torch.bfloat16, torch.tensor(lo)))
    q = (value - lo) / ulp
    assert 0.05 < q < 0.95, "the test value must sit between two bf16 values"
    results = []
    for _ in range(n_seeds):
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
        out = run_op([p0], [[g]], backend, lr=lr, state_dtype=torch.float32, sr_seed=seed)
        vals = out.params[0].double()
        assert ((vals == lo) | (vals == lo + ulp)).all(), "SR rounds to a neighbour"
        results.append(vals)
    mean = float(torch.cat(results).mean())
    sigma = ulp * math.sqrt(q * (1 - q) / (n * n_seeds))
    assert abs(mean - value) <= SR_MEAN_SIGMAS * sigma, (mean, value, sigma)


def _sr_pairs():
    bes = [b for d, b in SR_DEVICE_BACKENDS if d == "cpu"]
    return [(a, b) for i, a in enumerate(bes) for b in bes[i + 1:]]


@pytest.mark.parametrize("backend_a,backend_b", _sr_pairs())
def test_sr_bits_agree_across_backends(backend_a, backend_b):
    """Same seed, same inputs: the backends draw the same random bits per (tensor,
    element), so the rounded bf16 bits agree on (nearly) every element."""
    shapes = [(4097,), (0,), (300, 7), (), (70001,)]
    params0, init = _sr_setup("cpu", shapes)
    grads = rand_grads(params0, 1)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    outs = [run_op(params0, grads, be, state=_sr_state(init), sr_seed=seed, weight_decay=0.1,
                   decoupled=True, lr=1e-3) for be in (backend_a, backend_b)]
    a = torch.cat([p.reshape(-1) for p in outs[0].params]).view(torch.int16)
    b = torch.cat([p.reshape(-1) for p in outs[1].params]).view(torch.int16)
    agree = float((a == b).double().mean())
    assert agree >= SR_BIT_AGREEMENT, f"{backend_a} vs {backend_b}: {agree:.4%} of bits agree"


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
