"""Helpers the optimizer op tests share (tests/ops/test_optim_*.py): shapes, fresh params
and grads, the op-call driver (grads read-only, masters rounded into the params), torch's
own optimizer as the same-precision twin, the low-precision yardstick (error against the
float64 oracle at most LOWP_ERR_RATIO x torch's own at the same precision), NaN-poisoned
views, and the checks every op runs alike (GradScaler arguments, found_inf, stochastic
rounding: within an ulp, unbiased, the same bits on every backend). Each test module
passes what is specific to its op (its run_op, its states). Not a test module itself."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import device_backends
from tolerances import (LOWP_ERR_FLOOR_ULPS, LOWP_ERR_RATIO, SR_BIT_AGREEMENT, SR_MEAN_SIGMAS,
                        spacing, sr_bound, tol, ulp_error)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE_BACKENDS = device_backends()
STATE_CASES = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32),
               (torch.float16, None), (torch.float16, torch.float32)]
STATE_IDS = [f"{str(d)[6:]}-state_{str(s)[6:] if s else 'same'}" for d, s in STATE_CASES]


def backend_state_cases():
    """pytest params (device, backend, dtype, state_dtype): every STATE_CASES entry for the
    compiled kernels, three of them (fp32; bf16 params with fp32 states; fp16 params and
    states) for the Triton and reference backends, whose load/store code is the same for
    every dtype pair, to keep the interpreted test time down."""
    lean = {(torch.float32, None), (torch.bfloat16, torch.float32), (torch.float16, None)}
    out = []
    for device, backend in DEVICE_BACKENDS:
        for (dtype, sd), sid in zip(STATE_CASES, STATE_IDS):
            if backend in ("cpu", "cuda") or (dtype, sd) in lean:
                out.append(pytest.param(device, backend, dtype, sd, id=f"{device}-{backend}-{sid}"))
    return out


def dtype_id(x):
    return str(x).replace("torch.", "") if isinstance(x, torch.dtype) else None


def interpreted(device: str, backend: str) -> bool:
    """Triton under TRITON_INTERPRET pays ~15 ms per launch and ~1 ms per program."""
    return backend == "triton" and device == "cpu"


def small_shapes(n: int) -> list[tuple]:
    """n small shapes (1-D and 2-D, 1..64 per dim) with a 0-dim and a zero-size one among
    them, so per-tensor indexing past skipped tensors is exercised."""
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
    "many_small": lambda: small_shapes(60),
    "0dim": lambda: [()],
    "zero_size": lambda: [(0,), (3, 0, 2)],
}


# The shape cases the SGD / Adagrad / RMSprop op tests run: SHAPES with 70001 (3 CPU
# chunks of 32768, the last ragged; 2 interpreted Triton blocks) instead of 278011,
# which costs seconds per case in the float64 oracle and torch's low-precision runs.
SHAPE_NAMES = [name for name in SHAPES if name != "278011"] + ["70001"]


def shapes_for(name: str, device: str, backend: str) -> list[tuple]:
    if name == "many_small" and interpreted(device, backend):
        return small_shapes(12)  # 120 interpreted launches per step would take seconds
    if name == "70001":
        return [(70001,)]
    return SHAPES[name]()


def rand_grads(params, n_steps: int, *, scales=None, min_abs_fp16: float = 0.25):
    """Fresh grads per step (times scales[k] at step k). For fp16 params the magnitudes
    are kept >= min_abs_fp16: torch's fp16 path, our yardstick, keeps squared-gradient
    states in fp16, where g*g underflows for small g."""
    out = []
    for k in range(n_steps):
        s = 1.0 if scales is None else scales[k % len(scales)]
        gs = []
        for p in params:
            g = torch.randn(p.shape, device=p.device)
            if p.dtype == torch.float16:
                g = torch.where(g < 0, -1.0, 1.0) * g.abs().clamp_min(min_abs_fp16)
            gs.append((g * s).to(p.dtype))
        out.append(gs)
    return out


def trajectory_scale(p0: torch.Tensor, oracle_prefix) -> torch.Tensor:
    """max over steps t = 0..n of |param_t| (float64), elementwise; oracle_prefix(k) is
    the oracle's param after the first k steps (None past the last step). ulps are
    counted at this magnitude."""
    scale = p0.double().abs()
    k = 1
    while True:
        pk = oracle_prefix(k)
        if pk is None:
            return scale
        scale = torch.maximum(scale, pk.abs())
        k += 1


def trace_scale(p0: torch.Tensor, trace: list) -> torch.Tensor:
    """trajectory_scale from the params an oracle recorded after every step."""
    scale = p0.double().abs()
    for pk in trace:
        scale = torch.maximum(scale, pk.abs())
    return scale


def assert_lowp_close(got: torch.Tensor, want_torch: torch.Tensor, oracle: torch.Tensor,
                      scale: torch.Tensor, what: str = "param") -> None:
    """Low-precision yardstick for one tensor: ours' error vs the float64 oracle (in ulps
    of the storage dtype at `scale`) at most LOWP_ERR_RATIO x torch's (floored at
    LOWP_ERR_FLOOR_ULPS). See LowpErrors for the same over every tensor of a call."""
    assert got.dtype == want_torch.dtype
    assert torch.isfinite(want_torch).all(), "torch's own low-precision run must be finite"
    e_ours = ulp_error(got, oracle, got.dtype, scale)
    e_torch = ulp_error(want_torch, oracle, got.dtype, scale)
    assert e_ours <= LOWP_ERR_RATIO * max(e_torch, LOWP_ERR_FLOOR_ULPS), (
        f"{what} {tuple(got.shape)}: error {e_ours:.2f} ulp vs torch's {e_torch:.2f}")


class LowpErrors:
    """Low-precision yardstick over every tensor of one op call: ours' largest error vs
    the float64 oracle (in ulps of the storage dtype at `scale`) at most
    LOWP_ERR_RATIO x torch's largest (floored at LOWP_ERR_FLOOR_ULPS). Taken over the
    whole call, not per tensor: a tensor of a few elements holds only a few random
    roundings, whose ratio to torch's is noise; a wrong kernel is off by many ulps."""

    def __init__(self):
        self.ours = self.torch = 0.0
        self.worst = None

    def add(self, got: torch.Tensor, want_torch: torch.Tensor, oracle: torch.Tensor,
            scale: torch.Tensor) -> None:
        assert got.dtype == want_torch.dtype
        assert torch.isfinite(want_torch).all(), "torch's own low-precision run must be finite"
        e_ours = ulp_error(got, oracle, got.dtype, scale)
        if not e_ours <= self.ours:  # NaN included
            self.ours, self.worst = e_ours, tuple(got.shape)
        self.torch = max(self.torch, ulp_error(want_torch, oracle, got.dtype, scale))

    def check(self) -> None:
        assert self.ours <= LOWP_ERR_RATIO * max(self.torch, LOWP_ERR_FLOOR_ULPS), (
            f"error {self.ours:.2f} ulp (a param of shape {self.worst}) vs torch's "
            f"{self.torch:.2f}")


def assert_fp32_close(got, want) -> None:
    torch.testing.assert_close(got, want.to(got.dtype) if want.dtype != got.dtype else want,
                               **tol(torch.float32))


def assert_state_close_normwise(got, want, magnitude=None) -> None:
    """fp32 row of the table, with the absolute part scaled by the tensor's largest
    |value|: for states such as RMSprop's momentum buffer (a sum of g / avg terms that
    can be large and cancel), elementwise relative error is not what fp32 rounding
    bounds, the error relative to the tensor's scale is. magnitude (float64, elementwise,
    from the oracle: the state's terms summed in absolute value) raises that scale where
    the terms are larger still: a scalar or a small tensor whose every element cancels
    has no large |value| to lend its scale."""
    rtol, atol = tol(torch.float32).values()
    want = want.to(got.dtype)
    scale = float(want.abs().max()) if want.numel() else 0.0
    if magnitude is None:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol + rtol * scale)
        return
    assert got.shape == want.shape == magnitude.shape, (got.shape, want.shape, magnitude.shape)
    w = want.double().cpu()
    err = (got.double().cpu() - w).abs()
    allowed = atol + rtol * (magnitude.cpu().clamp_min(scale) + w.abs())
    bad = ~(err <= allowed)  # NaN fails
    if bad.any():
        j = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{int(bad.sum())} of {got.numel()} elements differ beyond the tolerance; first "
            f"at flat index {j}: got {got.reshape(-1)[j].item()!r}, want "
            f"{w.reshape(-1)[j].item()!r}, allowed {allowed.reshape(-1)[j].item():.3g} "
            f"(terms' magnitude {magnitude.reshape(-1)[j].item():.3g})")


# ----------------------------------------------------------------- poisoned memory
def embed(t: torch.Tensor):
    """A view of `t` inside a NaN buffer: [17 NaN | t | 17 NaN]; returns (buffer, view)."""
    pad = 17
    buf = torch.full((t.numel() + 2 * pad,), float("nan"), dtype=t.dtype, device=t.device)
    buf[pad:pad + t.numel()] = t.reshape(-1)
    return buf, buf[pad:pad + t.numel()].view(t.shape)


def embed_strided(t: torch.Tensor):
    """Every other element of a NaN buffer (a non-dense view); returns (buffer, view)."""
    buf = torch.full((2 * t.numel() + 1,), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[1::2]
    view.copy_(t.reshape(-1))
    return buf, view.view(t.shape) if t.dim() <= 1 else view


_IBITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_poison_intact(bufs) -> None:
    """bufs: (buffer, 1-D view, original buffer); the bits outside the view are unchanged."""
    for buf, view, orig in bufs:
        outside = torch.ones(buf.numel(), dtype=torch.bool, device=buf.device)
        start, step = view.storage_offset(), view.stride(0)
        outside[start:start + step * (view.numel() - 1) + 1:step] = False
        ib = _IBITS[buf.dtype]
        assert torch.equal(buf.view(ib)[outside], orig.view(ib)[outside])


class Poison:
    """Views into NaN-filled buffers, remembered so that check() can prove no bit outside
    them changed."""

    def __init__(self):
        self.bufs = []

    def view(self, t: torch.Tensor, strided: bool = False) -> torch.Tensor:
        """t's values in a view of a fresh NaN buffer (every other element if strided)."""
        buf, v = (embed_strided if strided else embed)(t)
        flat = buf[1::2] if strided else buf[17:17 + t.numel()]
        self.bufs.append((buf, flat, buf.clone()))
        return v

    def views(self, ts, strided_index=None):
        return [self.view(t, strided=i == strided_index) for i, t in enumerate(ts)]

    def check(self) -> None:
        assert_poison_intact(self.bufs)


# ----------------------------------------------------------------- inputs, op driver
def rand_params(shapes, device, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.randn(s, device=device).to(dtype) for s in shapes]


def master_inputs(device, dtype, shapes=((4097,), (13, 5), (), (0,))):
    """fp32 masters and the low-precision params they own: outputs only, NaN until the
    first step writes them."""
    masters = [torch.randn(s, device=device) for s in shapes]
    params = [torch.full(s, float("nan"), device=device, dtype=dtype) for s in shapes]
    return masters, params


def found_inf_inputs(device, master, shapes=((4097,), (), (0,))):
    """fp32 params, or bf16 params with fp32 masters that differ from them."""
    dtype = torch.bfloat16 if master else torch.float32
    params0 = rand_params(shapes, device, dtype)
    masters = [p.float() + 1e-3 * torch.randn_like(p.float()) for p in params0] if master \
        else None
    return params0, masters


def scaled(grads_seq, s):
    return [[g * s for g in gs] for gs in grads_seq]


def clone_state(state):
    return SimpleNamespace(**{k: [t.clone() for t in v] for k, v in vars(state).items()})


def _assert_same_values(a, b, what):
    nan = a.isnan()
    assert torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan]), what


def run_op_steps(step, params, grads_seq, state, *, masters=None, lr=1e-2,
                 lr_dtype=torch.float64, found_inf=None, clone=True):
    """The op driver of every run_op: len(grads_seq) calls step(k, params, grads, state,
    masters, lr_tensor) (one op call each) on clones of `params` (on `params` themselves
    with clone=False, e.g. views into poisoned memory) and of `masters`. Every call
    leaves the grads as they were; with masters and a step not skipped by found_inf,
    the params equal the masters rounded after every call. Returns every tensor the op
    owns: params, masters and `state`'s lists."""
    params = [p.clone() for p in params] if clone else params
    masters = [] if masters is None else [m.clone() for m in masters]
    dev = params[0].device if params else "cpu"
    lr_t = torch.tensor(lr, dtype=lr_dtype, device=dev)
    skipped = found_inf is not None and bool(found_inf)
    for k, grads in enumerate(grads_seq):
        before = [g.clone() for g in grads]
        step(k, params, grads, state, masters, lr_t)
        for g, b in zip(grads, before):
            _assert_same_values(g, b, "grads are read-only")
        if masters and not skipped:
            for p, m in zip(params, masters):
                assert torch.equal(p, m.to(p.dtype)), "param != its master rounded"
    return SimpleNamespace(params=params, masters=masters, **vars(state))


def run_torch_optim(cls, params, grads_seq, *, init_state=None, **hp):
    """torch's optimizer `cls` (for-loop implementation) on clones of `params`, from
    init_state (per param, {key: tensor}) if given; returns its params and itself."""
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    opt = cls(ps, foreach=False, **hp)
    if init_state is not None:
        for p, st in zip(ps, init_state):
            opt.state[p] = {k: v.clone() for k, v in st.items()}
    for grads in grads_seq:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    return ps, opt


def pop_lr_dtype(hp) -> torch.dtype:
    """A FLAGS entry's lr tensor dtype (float64 unless it says lr_dtype), taken out of hp."""
    return hp.pop("lr_dtype", torch.float64)


def lr_as_given(hp, lr_dtype, default=1e-2):
    """hp with lr the value the kernel was given (rounded to fp32 for an fp32 lr
    tensor), for torch and the oracle."""
    lr = hp.get("lr", default)
    if lr_dtype == torch.float32:
        lr = float(torch.tensor(lr, dtype=torch.float32))
    return dict(hp, lr=lr)


def check_twin_and_oracle(ours, params0, grads_seq, ref_ps, ref_opt, oracle, states, *,
                          state_close=assert_fp32_close):
    """fp32: ours ~ torch (ref_ps, ref_opt) ~ float64 oracle, params and every state torch
    keeps; the step counts equal torch's. bf16/fp16: ours' error against the oracle at
    most LOWP_ERR_RATIO x torch's (LowpErrors). oracle(i, p0, grads_i, trace) -> (param,
    {state key: tensor}) in float64, appending the param after every step to trace;
    states(i) -> ours' state tensors of param i by torch's key names. The oracle may
    return a third item, {state key: magnitude}, passed to state_close as magnitude=
    (see assert_state_close_normwise)."""
    lowp = LowpErrors()
    for i, p0 in enumerate(params0):
        trace = []
        want64, states64, *more = oracle(i, p0, [g[i] for g in grads_seq], trace)
        mags = more[0] if more else {}
        got, want = ours.params[i], ref_ps[i].detach()
        st = ref_opt.state[ref_ps[i]]
        assert got.dtype == p0.dtype and got.shape == p0.shape
        if "step" in st:
            assert float(ours.steps[i]) == float(st["step"])
        if p0.dtype == torch.float32:
            assert_fp32_close(got, want)
            torch.testing.assert_close(got.double(), want64, **tol(torch.float32))
            for key, t in states(i).items():
                if key in st:
                    kw = {"magnitude": mags[key]} if key in mags else {}
                    state_close(t, st[key], **kw)
                    state_close(t.double(), states64[key], **kw)
        else:
            lowp.add(got, want, want64, trace_scale(p0, trace))
    lowp.check()


# ------------------------------------------------------------------- GradScaler args
def check_grad_scale_unscales(run_op, params0, grads_seq, backend, **hp):
    """run_op(params0, grads, backend, grad_scale=..., **hp) with grads scaled by a power
    of two and grad_scale that power gives bit for bit the unscaled run (every tensor the
    op owns); returns the unscaled run and the run with grads scaled by 1000.5 (not a
    power of two) for the caller to judge."""
    dev = grads_seq[0][0].device
    plain = run_op(params0, grads_seq, backend, **hp)
    s = 2.0**12  # a power of two divides exactly: bit-identical to the unscaled step
    exact = run_op(params0, scaled(grads_seq, s), backend, grad_scale=torch.tensor(s, device=dev),
                   **hp)
    for key, ts in vars(plain).items():
        for a, b in zip(ts, getattr(exact, key)):
            assert torch.equal(a, b), key
    s = 1000.5
    return plain, run_op(params0, scaled(grads_seq, s), backend,
                         grad_scale=torch.tensor(s, device=dev), **hp)


def check_found_inf_skips_everything(run_op, params0, grads, backend, masters, state, **hp):
    """run_op(params0, grads, backend, masters=masters, state=..., found_inf=..., **hp):
    found_inf == 1 changes nothing at all (params, masters, every state, steps
    included); found_inf == 0 is the same as no found_inf, a normal step that moves the
    params and counts one more step."""
    dev = params0[0].device

    def run(st, found_inf):
        return run_op(params0, grads, backend, masters=masters, state=st, found_inf=found_inf,
                      **hp)

    before = clone_state(state)
    out = run(state, torch.tensor(1.0, device=dev))
    for a, b in zip(out.params + out.masters, params0 + (masters or [])):
        assert torch.equal(a, b)
    for key, ts in vars(before).items():
        for a, b in zip(getattr(out, key), ts):
            assert torch.equal(a, b), key
    run_fi = run(clone_state(before), torch.tensor(0.0, device=dev))
    run_no = run(clone_state(before), None)
    for key, ts in vars(run_no).items():
        for a, b in zip(getattr(run_fi, key), ts):
            assert torch.equal(a, b), key
    assert not torch.equal(run_no.params[0], params0[0])
    for a, b in zip(getattr(run_no, "steps", []), getattr(before, "steps", [])):
        assert float(a) == float(b) + 1


# -------------------------------------------------------------------- poisoned memory
def check_poisoned_views(run_op, make_state, backend, params0, grads_seq, *, strided=True,
                         **hp):
    """Every tensor the op reads or writes (params, grads, make_state(params0)'s lists but
    the step counts) is a view into a NaN-filled buffer, one param a strided view unless
    strided=False: the op neither reads the NaNs (every result equals a run on clean
    tensors) nor writes outside the views (no bit of the poison changes)."""
    clean = run_op(params0, grads_seq, backend, **hp)
    poison = Poison()
    state = SimpleNamespace(**{k: v if k == "steps" else poison.views(v)
                               for k, v in vars(make_state(params0)).items()})
    out = run_op(poison.views(params0, strided_index=1 if strided else None),
                 [poison.views(gs) for gs in grads_seq], backend, state=state, clone=False, **hp)
    for key, ts in vars(clean).items():
        for a, b in zip(getattr(out, key), ts):
            assert torch.equal(a, b), key
    poison.check()


# ---------------------------------------------------------------- stochastic rounding
def cpu_backend_pairs():
    """Every pair of CPU backends, for the same-bits test."""
    bes = [b for d, b in DEVICE_BACKENDS if d == "cpu"]
    return [(a, b) for i, a in enumerate(bes) for b in bes[i + 1:]]


def assert_sr_within_one_ulp(got_params, wants):
    """Each stochastically rounded bf16 param within tolerances.sr_bound of its fp32
    update (a tensor, any float dtype)."""
    for got, want in zip(got_params, wants):
        want = want.detach().double()
        assert got.dtype == torch.bfloat16
        assert ((got.double() - want).abs() <= sr_bound(want)).all()


def bf16_bits(params) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params]).view(torch.int16)


def check_sr_bits_agree(run, backend_a, backend_b, sr_happened=True):
    """run(backend, sr) -> bf16 params after one step from the same inputs, with the same
    seed if sr. The backends draw the same random bits per (tensor, element), so the
    rounded bits agree on (nearly) every element; sr_happened: and rounding stochastically
    really moved some elements away from round-to-nearest."""
    a, b = bf16_bits(run(backend_a, True)), bf16_bits(run(backend_b, True))
    agree = float((a == b).double().mean())
    assert agree >= SR_BIT_AGREEMENT, f"{backend_a} vs {backend_b}: {agree:.4%} of bits agree"
    if sr_happened:
        assert float((a != bf16_bits(run(backend_a, False))).double().mean()) > 0.05


def check_sr_unbiased(value, round_once, device, q_margin, n=65536, n_seeds=4):
    """One fixed fp32 value (q of the way between two bf16 neighbours, q_margin < q <
    1 - q_margin) rounded stochastically, round_once(seed) -> n bf16 elements, for
    n_seeds seeds: every element is a neighbour, and the mean approaches the value
    within SR_MEAN_SIGMAS (round-to-nearest would be > 100 sigma away)."""
    lo = float(torch.tensor(value).bfloat16().float())
    if lo > value:
        lo -= float(spacing(torch.bfloat16, torch.tensor(value)))
    ulp = float(spacing(torch.bfloat16, torch.tensor(lo)))
    q = (value - lo) / ulp
    assert q_margin < q < 1 - q_margin, "the test value must sit between two bf16 values"
    results = []
    for _ in range(n_seeds):
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
        vals = round_once(seed).double()
        assert ((vals == lo) | (vals == lo + ulp)).all(), "SR rounds to a neighbour"
        results.append(vals)
    mean = float(torch.cat(results).mean())
    sigma = ulp * math.sqrt(q * (1 - q) / (n * n_seeds))
    assert abs(mean - value) <= SR_MEAN_SIGMAS * sigma, (mean, value, sigma)


def sr_unbiased_inputs(device, n=65536):
    """A random lr in [0.5e-3, 3.5e-3] and bf16 ones as params and grads."""
    lr = float(torch.empty(()).uniform_(0.5e-3, 3.5e-3))
    ones = torch.ones(n, dtype=torch.bfloat16, device=device)
    return lr, ones, ones.clone()


def sr_seed(device):
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
