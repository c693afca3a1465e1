"""dlopt_kernels.optim.clip_grad_norm_ / get_total_norm as drop-ins for torch.nn.utils:
same results (total norm and clipped grads) over backends, norm types, grad dtypes and
odd shapes; torch's error and edge-case behaviour; torch.compile. Tolerances come from
tests/tolerances.py only.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from conftest import GPU, device_backends
from reference import vector_norms_float64
from tolerances import (NORM_TOL, NORM_TOL_P, TRAIN_LOSS_MAX_FRACTION, TRAIN_LOSS_RTOL, spacing,
                        tol)

from dlopt_kernels.optim import clip_grad_norm_, get_total_norm

DEVICE_BACKENDS = device_backends()
SHAPES = [(4097,), (33, 7), (), (0,), (1,), (5, 3)]


def make(shapes=SHAPES, dtype=torch.float32, device="cpu", scale=1.0, transposed=True):
    params = [nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, device=device) * scale).to(dtype)
    if transposed and len(params) > 1:  # a grad whose strides differ from its param's
        p = params[1]
        p.grad = (torch.randn(p.shape[::-1], device=device) * scale).to(dtype).t()
    return params


def twin(params):
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        if p.grad is not None:
            q.grad = p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("max_norm_factor", [0.3, 3.0], ids=["clips", "no_clip"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0, "inf"], ids=str)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_matches_torch(device, backend, norm_type, max_norm_factor):
    params = make(device=device, scale=float(torch.empty(()).uniform_(0.1, 10)))
    if float(norm_type) == math.inf:
        params[3].grad = None  # torch raises for an empty grad (see test_edge_cases)
    ref = twin(params)
    grads0 = [p.grad.clone() for p in params if p.grad is not None]
    _, exact = vector_norms_float64(grads0, float(norm_type))
    max_norm = max_norm_factor * float(exact)
    got = clip_grad_norm_(params, max_norm, norm_type, backend=backend)
    want = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    assert got.dtype == want.dtype and got.shape == () and got.device == want.device
    ntol = NORM_TOL_P if norm_type == 3.0 else NORM_TOL
    torch.testing.assert_close(got.double().cpu(), exact, **ntol)
    for p, q, g0 in zip([p for p in params if p.grad is not None],
                        [q for q in ref if q.grad is not None], grads0):
        assert p.grad.stride() == q.grad.stride()  # scaled in place
        if max_norm_factor > 1:  # coefficient clamped to 1: grads unchanged
            assert torch.equal(p.grad, g0)
        torch.testing.assert_close(p.grad, q.grad, **tol(torch.float32))


@pytest.mark.parametrize("norm_type", [0.0, -math.inf, -1.0], ids=str)
def test_unusual_norm_types_match_torch(norm_type):
    params = make(shapes=[(100,), (7, 3), (5,)], transposed=False)
    params[0].grad[::3] = 0
    params[2].grad.zero_()  # ord 0: a tensor with a zero norm is not counted
    ref = twin(params)
    got = clip_grad_norm_(params, 1.0, norm_type)
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
    torch.testing.assert_close(got.double(), want.double(), **NORM_TOL)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.grad, q.grad, **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_low_precision_grads(device, backend, dtype):
    """The total comes back in the grad dtype, as torch's, within one ulp of the exact
    norm (ours rounds once; torch also rounds every per-tensor norm first); grads are
    scaled as torch scales them with the same total."""
    params = make(dtype=dtype, device=device)
    ref = twin(params)
    _, exact = vector_norms_float64([p.grad for p in params])
    got = clip_grad_norm_(params, 0.5 * float(exact), backend=backend)
    assert got.dtype == dtype
    assert abs(float(got) - float(exact)) <= float(spacing(dtype, exact))
    torch.nn.utils.clip_grads_with_norm_(ref, 0.5 * float(exact), got.clone())
    for p, q in zip(params, ref):
        assert torch.equal(p.grad, q.grad)


def test_mixed_dtypes_result_dtype():
    params = make(shapes=[(50,), (8,)]) + make(shapes=[(30,)], dtype=torch.bfloat16)
    params += make(shapes=[(9,)], dtype=torch.float64)
    ref = twin(params)
    _, exact = vector_norms_float64([p.grad for p in params])
    got = clip_grad_norm_(params, 0.1)
    want = torch.nn.utils.clip_grad_norm_(ref, 0.1)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, exact, **NORM_TOL)
    # torch rounds the bf16 group's norm to bf16 before combining
    torch.testing.assert_close(got, want, **tol(torch.bfloat16))
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.grad.double(), q.grad.double(), **tol(torch.bfloat16))


@pytest.mark.parametrize("foreach", [None, True, False], ids=str)
def test_foreach_flag_same_result(foreach):
    params = make()
    ref = twin(params)
    got = clip_grad_norm_(params, 0.5, foreach=foreach)
    want = torch.nn.utils.clip_grad_norm_(ref, 0.5, foreach=foreach)
    torch.testing.assert_close(got, want, **NORM_TOL)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.grad, q.grad, **tol(torch.float32))


def test_nonfinite():
    params = make(transposed=False)
    params[0].grad[3] = float("nan")
    ref = twin(params)
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(ref, 1.0, error_if_nonfinite=True)
    for p, q in zip(params, ref):  # the error comes before any grad is touched
        assert torch.equal(p.grad.isnan(), q.grad.isnan())
        assert torch.equal(p.grad.nan_to_num(), q.grad.nan_to_num())
    got = clip_grad_norm_(params, 1.0)
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert got.isnan() and want.isnan()
    for p, q in zip(params, ref):  # scaled by NaN, as torch does
        assert torch.equal(p.grad.isnan(), q.grad.isnan())
    params = make(transposed=False)
    params[2].grad.fill_(float("inf"))
    assert clip_grad_norm_(params, 1.0) == math.inf
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)


def test_edge_cases_match_torch():
    # no params / no grads: a CPU tensor 0.0 and nothing to scale
    assert torch.equal(clip_grad_norm_([], 1.0), torch.nn.utils.clip_grad_norm_([], 1.0))
    no_grad = [nn.Parameter(torch.randn(3))]
    assert float(clip_grad_norm_(no_grad, 1.0)) == 0.0 and no_grad[0].grad is None
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        clip_grad_norm_((p for p in []), 1.0)
    assert any("empty generator" in str(x.message) for x in w)
    # one tensor (not a list), params without grads mixed in, an int max_norm
    p = make(shapes=[(20,)], transposed=False)[0]
    q = twin([p])[0]
    torch.testing.assert_close(clip_grad_norm_(p, 1), torch.nn.utils.clip_grad_norm_(q, 1),
                               **NORM_TOL)
    torch.testing.assert_close(p.grad, q.grad, **tol(torch.float32))
    params = make(transposed=False)
    params[2].grad = None
    ref = twin(params)
    torch.testing.assert_close(clip_grad_norm_(params, 0.2),
                               torch.nn.utils.clip_grad_norm_(ref, 0.2), **NORM_TOL)
    # an empty grad with the inf norm: torch raises, ours counts nothing for it
    params = make(shapes=[(0,), (4,)], transposed=False)
    want = float(params[1].grad.abs().max())
    assert float(clip_grad_norm_(params, 1.0, math.inf)) == want


def test_bad_arguments():
    params = make(transposed=False)
    before = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match="backend"):
        clip_grad_norm_(params, 1.0, backend="nope")
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm_(params, 1.0, norm_type="two")
    with pytest.raises(TypeError, match="norm_type"):
        clip_grad_norm_(params, 1.0, norm_type=None)
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


def test_get_total_norm_matches_torch():
    ts = [torch.randn(s) for s in [(100,), (3, 4), ()]]
    for ord in (2.0, 1.0, math.inf):
        torch.testing.assert_close(get_total_norm(ts, ord),
                                   torch.nn.utils.get_total_norm(ts, ord), **NORM_TOL)


def test_compiled_matches_eager():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    model(torch.randn(5, 8)).square().mean().backward()
    params = list(model.parameters())
    ref = twin(params)

    def clip(ps):
        return clip_grad_norm_(ps, 0.05)

    got = torch.compile(clip, fullgraph=True)(params)
    want = clip(ref)
    assert torch.equal(got, want)
    for p, q in zip(params, ref):
        assert torch.equal(p.grad, q.grad)


def test_training_matches_torch():
    """A small MLP on a synthetic regression task, trained with SGD and gradient clipping
    every step (the clip is active throughout): ours and torch's clipping reach the same
    loss, and the model has learned."""
    x = torch.randn(256, 8)
    y = torch.tanh(x @ torch.randn(8, 1))
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    models = [model, copy.deepcopy(model)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    final, clipped = [], 0
    for k, (m, o) in enumerate(zip(models, opts)):
        clip = clip_grad_norm_ if k == 0 else torch.nn.utils.clip_grad_norm_
        for _ in range(80):
            o.zero_grad()
            loss = (m(x) - y).square().mean()
            loss.backward()
            clipped += float(clip(m.parameters(), 0.1)) > 0.1
            o.step()
        with torch.no_grad():
            final.append(float((m(x) - y).square().mean()))
    assert clipped >= 80, "the clip must be active for most steps"
    assert final[0] <= TRAIN_LOSS_MAX_FRACTION * float(y.square().mean()), final
    assert abs(final[0] - final[1]) <= TRAIN_LOSS_RTOL * final[1], final


@pytest.mark.skipif(not GPU, reason="needs a GPU")
def test_grads_on_cuda_and_cpu_match_torch():
    params = make(shapes=[(100,), (7, 3)], device="cuda") + make(shapes=[(50,)], device="cpu")
    ref = twin(params)
    got = clip_grad_norm_(params, 0.3)
    want = torch.nn.utils.clip_grad_norm_(ref, 0.3)
    assert got.device == want.device
    torch.testing.assert_close(got, want, **NORM_TOL)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.grad, q.grad, **tol(torch.float32))


@pytest.mark.skipif(not GPU, reason="needs a GPU")
def test_no_host_sync_on_cuda():
    params = make(shapes=[(100,), (7, 3)], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clip_grad_norm_(params, 0.3)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("total", [5.0, 0.5, math.nan], ids=["clips", "no_clip", "nan"])
def test_scaling_matches_torch_bit_for_bit(foreach, total):
    """Given the same total norm, the grads are scaled exactly as torch scales them (on
    the CPU by dlopt_C::multi_tensor_scale_, unless foreach=False): fp32, bf16 and fp16
    grads in one list, with transposed, zero-size and 0-dim ones; and a bf16 total."""
    from dlopt_kernels.optim.clip_grad import _clip_grads_with_norm_
    mixed = make(scale=3.0) + make(dtype=torch.bfloat16, scale=3.0) + make(dtype=torch.float16)
    for params, t in ((mixed, torch.tensor(total)),
                      (make(dtype=torch.bfloat16), torch.tensor(total, dtype=torch.bfloat16))):
        ref = twin(params)
        _clip_grads_with_norm_(params, 1.0, t, foreach)
        torch.nn.utils.clip_grads_with_norm_(ref, 1.0, t, foreach)
        for p, q in zip(params, ref):
            assert p.grad.stride() == q.grad.stride()
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, equal_nan=True)


def test_scale_op_schema():
    """The internal dlopt_C::multi_tensor_scale_ declares what it mutates (opcheck's
    schema test: it writes only `tensors`)."""
    ts = [torch.randn(5), torch.randn(3, 4).t(), torch.randn(()).to(torch.bfloat16)]
    torch.library.opcheck(torch.ops.dlopt_C.multi_tensor_scale_.default,
                          (ts, torch.tensor(0.5)), test_utils=("test_schema",))


def test_scale_op_refuses_bad_input():
    """dlopt_C::multi_tensor_scale_ refuses an integer or float64 tensor and a scale that
    is not one element with an error naming the argument, and changes nothing; an empty
    list is a no-op."""
    op = torch.ops.dlopt_C.multi_tensor_scale_
    good = torch.randn(7)
    before = good.clone()
    for bad, scale, name in (([good, torch.ones(3, dtype=torch.int32)], torch.tensor(0.5),
                              "tensors\\[1\\]"),
                             ([good, torch.ones(3, dtype=torch.float64)], torch.tensor(0.5),
                              "tensors\\[1\\]"),
                             ([good], torch.ones(2), "scale")):
        with pytest.raises(RuntimeError, match=name):
            op(bad, scale)
        assert torch.equal(good, before)
    op([], torch.tensor(0.5))
