"""torch.ops.dlopt.multi_tensor_norm, per backend: against a float64 oracle
(torch.linalg.vector_norm on float64 copies, tests/reference.py) over input dtypes,
odd shapes and every kind of norm; NaN / inf propagation; views into poisoned memory;
determinism; opcheck and torch.compile.

Tolerances come from tests/tolerances.py only; inputs are fresh random every run.
"""
from __future__ import annotations

import math

import pytest
import torch

from optim_op_helpers import DEVICE_BACKENDS, dtype_id, interpreted, small_shapes
from reference import vector_norms_float64
from tolerances import NORM_TOL, NORM_TOL_P

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ORDS = [2.0, 1.0, math.inf, -math.inf, 0.0, 3.0, 0.5, -1.5]
op = torch.ops.dlopt.multi_tensor_norm


SHAPES = {
    "1": lambda: [(1,)],
    "4097": lambda: [(4097,)],
    # 32768 / 65536: chunk edges of the CPU / CUDA kernels
    "chunk_edges": lambda: [(32768,), (32769,), (65537,), (3,)],
    "278011": lambda: [(278011,)],
    "many_small": lambda: small_shapes(120),
    "0dim": lambda: [()],
    "zero_size": lambda: [(0,), (3, 0, 2), (5,)],
}


def rand(shape, dtype, device, transposed=False):
    t = torch.randn(shape, device=device) * torch.empty((), device=device).uniform_(0.1, 10)
    if transposed and len(shape) == 2:
        t = torch.randn(shape[::-1], device=device).t()
    return t.to(dtype)


def tol_for(ord):
    return NORM_TOL_P if ord not in (2.0, 1.0, math.inf, -math.inf, 0.0) else NORM_TOL


def check(tensors, ord, backend, device):
    before = [t.clone() for t in tensors]
    norms, total = op(tensors, ord, backend)
    want_norms, want_total = vector_norms_float64(tensors, ord)
    assert norms.dtype == torch.float32 and norms.shape == (len(tensors),)
    assert total.dtype == torch.float32 and total.shape == ()
    assert norms.device.type == total.device.type == torch.device(device).type
    torch.testing.assert_close(norms.double().cpu(), want_norms, **tol_for(ord))
    torch.testing.assert_close(total.double().cpu(), want_total, **tol_for(ord))
    for a, b in zip(tensors, before):  # read-only
        assert torch.equal(a, b)
    return norms, total


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_shapes_dtypes(device, backend, dtype, shape_name):
    shapes = SHAPES[shape_name]()
    if shape_name == "many_small" and interpreted(device, backend):
        shapes = small_shapes(30)
    tensors = [rand(s, dtype, device) for s in shapes]
    for ord in (2.0, math.inf):
        check(tensors, ord, backend, device)


@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_every_norm_type(device, backend, ord):
    """Mixed dtypes, a transposed and a strided (non-dense) view, a zero-size and a
    0-dim tensor in one call, with exact zeros among the values."""
    tensors = [rand((4097,), torch.float32, device), rand((33, 7), torch.bfloat16, device,
                                                          transposed=True),
               rand((), torch.float16, device), rand((0,), torch.float32, device),
               rand((200,), torch.float64, device)[::3], rand((5, 3), torch.float32, device)]
    tensors[0][::7] = 0.0
    check(tensors, ord, backend, device)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_and_inf_propagate(device, backend):
    for ord in ORDS:
        clean = rand((1000,), torch.float32, device)
        bad = rand((3000,), torch.float32, device)
        bad[1234] = float("nan")
        norms, total = op([clean, bad], ord, backend)
        want, _ = vector_norms_float64([clean], ord)
        torch.testing.assert_close(norms[0].double().cpu(), want[0], **tol_for(ord))
        if ord == 0.0:  # NaN counts as non-zero, as in torch
            assert float(norms[1]) == 3000 and float(total) == 2
        else:
            assert math.isnan(float(norms[1])) and math.isnan(float(total)), ord
    big = rand((100,), torch.float32, device)
    big[7] = float("inf")
    for ord, want in ((2.0, math.inf), (math.inf, math.inf), (1.0, math.inf)):
        norms, total = op([big], ord, backend)
        assert float(norms[0]) == want and float(total) == want


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_views_into_poisoned_buffers(device, backend):
    """Views into NaN-filled buffers: nothing outside the views is read."""
    pad = 17
    clean = [rand((4097,), torch.float32, device), rand((40, 9), torch.bfloat16, device)]
    views = []
    for t in clean:
        buf = torch.full((t.numel() + 2 * pad,), float("nan"), dtype=t.dtype, device=device)
        buf[pad:pad + t.numel()] = t.reshape(-1)
        views.append(buf[pad:pad + t.numel()].view(t.shape))
    strided = torch.full((2 * 501,), float("nan"), device=device)[1::2]
    strided.copy_(rand((501,), torch.float32, device))
    views.append(strided)
    clean.append(strided.clone())
    # Compiled Triton lays a block out by the pointers' alignment (offset views: one
    # element per thread, aligned tensors: four), so its sums may add in another order:
    # bit-equal for max/min, within NORM_TOL for sums. A read of the poison is NaN.
    reordered = device == "cuda" and backend == "triton"
    for ord in (2.0, math.inf, -math.inf):
        a = op(views, ord, backend)
        b = op(clean, ord, backend)
        if reordered and ord == 2.0:
            torch.testing.assert_close(a, b, **NORM_TOL)
        else:
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_deterministic(device, backend):
    tensors = [rand((70001,), torch.float32, device), rand((300, 7), torch.float16, device)]
    first = op(tensors, 2.0, backend)
    for _ in range(2):
        again = op(tensors, 2.0, backend)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_cpu_result_independent_of_thread_count():
    tensors = [rand((300001,), torch.float32, "cpu"), rand((100, 1000), torch.bfloat16, "cpu")]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(tensors, 2.0, "cpu")
        torch.set_num_threads(max(2, threads))
        many = op(tensors, 2.0, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_cpu_accumulates_beyond_fp32():
    """Many equal values: an fp32 running sum would drift by many ulps; the CPU kernel
    sums at most 8 fp32 terms per partial and the partials in double."""
    t = torch.full((3_000_001,), 0.1)
    norms, total = op([t], 2.0, "cpu")
    exact = math.sqrt(3_000_001 * float(torch.tensor(0.1)) ** 2)
    assert float(total) == float(torch.tensor(exact, dtype=torch.float32))


@pytest.mark.parametrize("ord", [2.0, 1.0])
def test_cpu_huge_finite_values_give_a_finite_norm(ord):
    """Squares above FLT_MAX overflow the kernel's fp32 partial sums; the chunk is then
    summed again in double, so the norm is finite and right, as torch's on the CPU."""
    t = torch.full((1000,), 3e19) * torch.rand(1000).add_(0.5)
    norms, total = op([t, torch.randn(100)], ord, "cpu")
    want = torch.linalg.vector_norm(t.double(), ord)
    assert math.isfinite(float(total))
    torch.testing.assert_close(norms[0].double(), want, **NORM_TOL)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_list(device, backend):
    norms, total = op([], 2.0, backend)
    assert norms.shape == (0,) and float(total) == 0.0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bad_dtype(device, backend):
    with pytest.raises((RuntimeError, TypeError), match="dtype"):
        op([torch.ones(3, device=device), torch.ones(3, dtype=torch.int32, device=device)], 2.0,
           backend)


def _samples(device, backend):
    f = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    return {
        "fp32": ([f(65), f(3, 4)], 2.0, backend),
        "mixed_inf": ([f(65).bfloat16(), f(7).half(), f(2, 3).t()], math.inf, backend),
        "p3_zero_size": ([f(0), f(9)], 3.0, backend),
    }


@pytest.mark.parametrize("sample", ["fp32", "mixed_inf", "p3_zero_size"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend, sample):
    torch.library.opcheck(op.default, _samples(device, backend)[sample])


@pytest.mark.parametrize("device,backend", [db for db in DEVICE_BACKENDS if db[1] != "triton"])
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    tensors = [rand((1000,), torch.float32, device), rand((7, 3), torch.bfloat16, device)]

    def f(ts):
        norms, total = op(ts, 2.0, backend)
        return norms * 2, total + 1

    got = torch.compile(f, fullgraph=True)(tensors)
    want = f(tensors)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
