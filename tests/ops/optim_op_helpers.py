"""Helpers the element-wise optimizer op tests share (tests/ops/test_optim_sgd.py,
test_optim_adagrad.py, test_optim_rmsprop.py): shapes, fresh grads, the low-precision
yardstick (error against the float64 oracle at most LOWP_ERR_RATIO x torch's own at the
same precision) and NaN-poisoned views. Not a test module itself."""
from __future__ import annotations

import pytest
import torch

from conftest import device_backends
from tolerances import LOWP_ERR_FLOOR_ULPS, LOWP_ERR_RATIO, tol, ulp_error

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
    """Triton under TRITON_INTERPRET pays ~15 ms per launch (one per tensor)."""
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


def assert_state_close_normwise(got, want) -> None:
    """fp32 row of the table, with the absolute part scaled by the tensor's largest
    |value|: for states such as RMSprop's momentum buffer (a sum of g / avg terms that
    can be large and cancel), elementwise relative error is not what fp32 rounding
    bounds, the error relative to the tensor's scale is."""
    rtol, atol = tol(torch.float32).values()
    want = want.to(got.dtype)
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol + rtol * scale)


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
