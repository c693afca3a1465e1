"""float64 and complex params, as torch.optim takes them.

float64 params (and complex128, as float64 views) are computed in double: by the C++ CPU
and Triton kernels of the element-wise optimizers, Adafactor's C++ CPU kernel, and the
reference kernels (LAMB; any op on a GPU without Triton); complex params of the
optimizers whose torch twin takes them (Adam, AdamW, SGD, Adagrad, RMSprop) are stepped
as their real views, as torch does. Each is checked step by step against the torch
twin at the dtype's tolerance (tests/tolerances.py), Lion and LAMB against the float64
equations of their papers (tests/reference.py); checkpoints go both ways; what cannot
run is refused naming the argument, and changes nothing.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import GPU, device_backends
from optim_twin_helpers import (assert_construction_refused, assert_same_training,
                                check_ours_checkpoint_into_torch,
                                check_torch_checkpoint_into_ours, twin_run)
from reference import LambFloat64, adafactor_float64, lion_float64
from tolerances import tol

from dlopt_kernels import optim as dlopt_optim
from dlopt_kernels.backends import registry

DEVICES = ["cpu"] + (["cuda"] if GPU else [])
# zero-size, 0-dim, odd sizes, and a transposed (non-contiguous) matrix
SHAPES = [(7, 13), (13,), (), (0,), (4097,)]

# name -> constructor kwargs tried (each against torch's twin of the same name)
TWIN_CASES = {
    "Adam": [dict(lr=1e-2, weight_decay=0.1), dict(lr=1e-2, amsgrad=True, maximize=True)],
    "AdamW": [dict(lr=1e-2), dict(lr=1e-2, amsgrad=True, weight_decay=0.3)],
    "SGD": [dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
            dict(lr=1e-2, momentum=0.9, dampening=0.3, maximize=True), dict(lr=0.1)],
    "Adagrad": [dict(lr=1e-2, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.1)],
    "RMSprop": [dict(lr=1e-2, momentum=0.5, weight_decay=0.1),
                dict(lr=1e-2, centered=True, momentum=0.5)],
    "Adafactor": [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1, maximize=True)],
}
COMPLEX_OK = ("Adam", "AdamW", "SGD", "Adagrad", "RMSprop")
WIDE = (torch.float64, torch.complex128)


def _tolerance(dtype):
    return tol(torch.float64 if dtype in WIDE else torch.float32)


def _params(dtype, device, shapes=SHAPES):
    ps = [nn.Parameter(torch.randn(s, dtype=dtype, device=device)) for s in shapes]
    ps.append(nn.Parameter(torch.randn(5, 3, dtype=dtype, device=device).t()))  # transposed
    return ps


def _cases():
    out = []
    for name, variants in TWIN_CASES.items():
        for dtype in (torch.float64, torch.complex64, torch.complex128):
            if dtype.is_complex and name not in COMPLEX_OK:
                continue
            for k, kwargs in enumerate(variants):
                if dtype == torch.complex64 and kwargs.get("centered"):
                    continue  # fp32 centered RMSprop amplifies rounding: test_rmsprop.py's judge
                out.append(pytest.param(name, dtype, kwargs,
                                        id=f"{name}-{str(dtype)[6:]}-{k}"))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,dtype,kwargs", _cases())
def test_matches_torch(name, dtype, kwargs, device):
    """Four steps against torch's twin (its for-loop implementation), params and every
    state compared after each step at the dtype's tolerance."""
    # (torch's Adafactor divides by zero on a zero-size param)
    params = _params(dtype, device, [s for s in SHAPES if name != "Adafactor" or s != (0,)])
    ours_cls, twin_cls = getattr(dlopt_optim, name), getattr(torch.optim, name)
    ours, _, _ = twin_run(ours_cls, twin_cls, kwargs, params, 4, tolerance=_tolerance(dtype))
    for p in params:
        if p.grad is not None and p.numel():
            for key, value in ours.state[p].items():
                if key != "step":  # states keep the param's dtype, as torch's
                    assert value.dtype == p.dtype, key


def _float64_backends():
    """(name, device, backend) for each optimizer with a torch twin and complex support
    and each backend here whose kernels take float64 params (the CUDA kernels compute in
    fp32 and refuse them: test_explicit_backend_float64)."""
    return [pytest.param(n, d, b, id=f"{n}-{d}-{b}") for n in COMPLEX_OK
            for d, b in device_backends()
            if registry.why_not_dtype(getattr(dlopt_optim, n)._op_name, b, torch.float64) is None]


@pytest.mark.parametrize("name,device,backend", _float64_backends())
def test_float64_on_every_backend(name, device, backend):
    """float64 params on each backend that takes them (the C++ CPU and Triton kernels
    in double, the reference), against torch's twin at the float64 tolerance."""
    params = _params(torch.float64, device)
    twin_run(getattr(dlopt_optim, name), getattr(torch.optim, name),
             dict(TWIN_CASES[name][-1], backend=backend), params, 3,
             tolerance=tol(torch.float64))


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("name", COMPLEX_OK)
def test_complex64_on_every_backend(name, device, backend):
    """complex64 params run the fp32 kernels of every backend on their real views."""
    params = _params(torch.complex64, device)
    twin_run(getattr(dlopt_optim, name), getattr(torch.optim, name),
             dict(TWIN_CASES[name][0], backend=backend), params, 3, tolerance=tol(torch.float32))


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_mixed_group_matches_torch(name):
    """One group of float32, float64, complex64 and bfloat16 params: every dtype's
    bucket steps on its own backend and all match torch's twin (the fp32 tolerance:
    the loosest of the float dtypes here; bf16 at its own below)."""
    kwargs = TWIN_CASES[name][0]
    params = [nn.Parameter(torch.randn(6, 5, dtype=dt))
              for dt in (torch.float32, torch.float64, torch.complex64, torch.complex128)]
    ours_cls, twin_cls = getattr(dlopt_optim, name), getattr(torch.optim, name)
    twin_run(ours_cls, twin_cls, kwargs, params, 3, tolerance=tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("name", ["AdamW", "SGD", "Adagrad", "RMSprop"])
def test_checkpoints_both_ways(name, dtype):
    """A torch checkpoint of float64 / complex params loads into ours and training goes
    on as torch's does, and ours loads into torch likewise."""
    kwargs = TWIN_CASES[name][0]
    ours_cls, twin_cls = getattr(dlopt_optim, name), getattr(torch.optim, name)
    tolerance = _tolerance(dtype)
    check_torch_checkpoint_into_ours(lambda ps: twin_cls(ps, **kwargs, foreach=False),
                                     lambda ps: ours_cls(ps, **kwargs), _params(dtype, "cpu"),
                                     ("lr",), tolerance=tolerance)
    check_ours_checkpoint_into_torch(lambda ps: ours_cls(ps, **kwargs),
                                     lambda ps: twin_cls(ps, **kwargs, foreach=False),
                                     _params(dtype, "cpu"), tolerance=tolerance)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("kwargs", [dict(lr=1e-2), dict(lr=3e-3, weight_decay=0.1, maximize=True)],
                         ids=["plain", "decay_maximize"])
def test_lion_float64_matches_paper(kwargs, device, backend):
    params = _params(torch.float64, device)
    opt = dlopt_optim.Lion(params, **kwargs, backend=backend)
    start = [p.detach().clone() for p in params]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    for i, p in enumerate(params):
        want, m, _ = lion_float64(start[i], [step[i] for step in grads], **kwargs)
        torch.testing.assert_close(p.detach(), want.to(device), **tol(torch.float64))
        torch.testing.assert_close(opt.state[p]["exp_avg"], m.to(device), **tol(torch.float64))


@pytest.mark.parametrize("device,backend", device_backends())
def test_l2_decay_of_cancelling_grads_matches_torch(device, backend):
    """Grads that nearly cancel weight_decay * p at some elements (|g + 0.1 p| ~ 1e-7,
    where RMSprop's eps matters): the L2 term is added with one rounding, as torch's
    `grad.add(param, alpha=weight_decay)`, so a float64 RMSprop step stays within the
    float64 tolerance of torch's for-loop step. (With the product rounded first, its
    momentum buffer missed torch's by thousands of ulps at such elements: a rare draw
    of test_matches_torch.) One step from equal params per draw: after that the two
    params differ by rounding, which the cancellation would amplify in any later g."""
    if registry.why_not_dtype("rmsprop_step", backend, torch.float64) is not None:
        pytest.skip(f"{backend} does not take float64 params")
    kwargs = dict(lr=1e-2, weight_decay=0.1, momentum=0.5)
    for _ in range(3):
        p0 = torch.randn(4097, dtype=torch.float64, device=device)
        ours_p, ref_p = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
        ours = dlopt_optim.RMSprop([ours_p], backend=backend, **kwargs)
        ref = torch.optim.RMSprop([ref_p], foreach=False, **kwargs)
        g = torch.randn_like(p0)
        cancel = torch.randperm(4097, device=device)[:64]
        g[cancel] = -0.1 * p0[cancel] + torch.randn(64, dtype=p0.dtype, device=device) * 1e-7
        ours_p.grad, ref_p.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        assert_same_training(ours, [ours_p], ref, [ref_p], tol(torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [dict(lr=1e-2), dict(lr=1e-2, max_grad_norm=1.0,
                                                        bias_correction=False)],
                         ids=["plain", "clipped"])
def test_lamb_float64_matches_paper(kwargs, device):
    _check_lamb_against_paper(_params(torch.float64, device), kwargs, 4, tol(torch.float64))


def _check_lamb_against_paper(params, kwargs, n_steps, tolerance):
    """Ours (LAMB(params, **kwargs)) against the paper's equations in float64
    (tests/reference.py LambFloat64) after each of n_steps steps on random grads."""
    opt = dlopt_optim.LAMB(params, **kwargs)
    oracle = LambFloat64(params, **{k: v for k, v in kwargs.items() if k != "backend"})
    for _ in range(n_steps):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        want = oracle.step(grads)
        for p, w in zip(params, want):
            torch.testing.assert_close(p.detach(), w.to(p), **tolerance)


@pytest.mark.parametrize("name", ["Lion", "LAMB", "Adafactor"])
def test_complex_refused_where_torch_has_no_complex_maths(name):
    params = [nn.Parameter(torch.randn(3, dtype=torch.complex64))]
    assert_construction_refused(getattr(dlopt_optim, name), params, {}, TypeError, "params")


# (optimizer, backend, whether its kernels compute float64 params in double): the
# element-wise optimizers' C++ CPU and Triton kernels do (Lion: test_lion_float64...), and
# LAMB's and Adafactor's C++ CPU kernels; their Triton ones compute in fp32
EXPLICIT = [(n, b, True) for n in ("AdamW", "SGD", "Adagrad", "RMSprop") for b in ("cpu", "triton")]
EXPLICIT += [("LAMB", "cpu", True), ("LAMB", "triton", False), ("Adafactor", "cpu", True),
             ("Adafactor", "triton", False)]
EXPLICIT += [(n, "cuda", False) for n in ("AdamW", "SGD", "LAMB")] if GPU else []


@pytest.mark.parametrize("name,backend,takes,dtype", [
    pytest.param(n, b, t, d, id=f"{n}-{b}-{str(d)[6:]}") for n, b, t in EXPLICIT
    for d in (torch.float64, torch.complex128) if n in COMPLEX_OK or not d.is_complex])
def test_explicit_backend_float64(name, backend, takes, dtype):
    """Asked for by name, a backend whose kernels compute in fp32 refuses float64 params
    (naming the backend) rather than step them at fp32 precision; the element-wise
    optimizers' C++ CPU and Triton kernels compute in double and take them (matching
    torch's twin at the float32 tolerance here, set by the float32 params of the mix;
    test_matches_torch holds float64 to the float64 one)."""
    device = "cuda" if backend == "cuda" else "cpu"
    if registry.why_unavailable(backend, device) is not None:
        pytest.skip(f"{backend} cannot run here")
    # (torch's Adafactor divides by zero on a zero-size param)
    shapes = [s for s in SHAPES if name != "Adafactor" or s != (0,)]
    params = _params(torch.float32, device, shapes) + _params(dtype, device, shapes)
    cls = getattr(dlopt_optim, name)
    if not takes:
        assert_construction_refused(cls, params, dict(backend=backend), ValueError, "backend")
        return
    if name == "LAMB":  # no torch twin: the paper's equations
        _check_lamb_against_paper(params, dict(lr=1e-2, backend=backend), 2, tol(torch.float32))
        return
    twin_run(cls, getattr(torch.optim, name), dict(lr=1e-2, backend=backend), params, 2,
             tolerance=tol(torch.float32))  # (the float32 params set the tolerance)


def test_reference_backend_runs_float64_on_request():
    params = _params(torch.float64, "cpu")
    twin_run(dlopt_optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, backend="reference"), params, 2,
             tolerance=tol(torch.float64))


def _adam_args(params, backend):
    """adam_step's arguments for `params` with fresh zero states."""
    z = [torch.zeros_like(p) for p in params]
    return ([p for p in params], [torch.randn_like(p) for p in params], z,
            [torch.zeros_like(p) for p in params], [], [],
            [torch.zeros((), device=p.device) for p in params], torch.tensor(1e-2, dtype=torch.float64),
            0.9, 0.999, 0.01, 1e-8, False, False, True, None, None, None, backend)


def _clone_args(args):
    return tuple([t.clone() if isinstance(t, torch.Tensor) else t for t in a]
                 if isinstance(a, list) else a for a in args)


def _lamb_args(params, backend):
    return ([p for p in params], [torch.randn_like(p) for p in params],
            [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], [],
            [torch.zeros(()) for _ in params], torch.tensor(1e-2, dtype=torch.float64), 0.9,
            0.999, 0.01, 1e-6, True, 0.0, None, None, None, None, backend)


def _assert_lists_equal(a, b):
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            assert torch.equal(s, t)


def _assert_refused(call, args, exc, match):
    """call(*args) raises exc (message matching `match`), and every list argument
    (params, grads, states) holds the same values as before the call."""
    before = _clone_args(tuple(args))
    with pytest.raises(exc, match=match):
        call(*args)
    _assert_lists_equal([x for x in args if isinstance(x, list)],
                        [x for x in before if isinstance(x, list)])


def test_op_refuses_float64_on_fp32_kernels():
    """torch.ops.dlopt.lamb_step on float64 lists with backend='triton' (whose kernels
    compute in fp32) refuses, naming the backend, and changes nothing."""
    if registry.why_unavailable("triton", "cpu") is not None:
        pytest.skip("triton cannot run here")
    params = [torch.randn(s, dtype=torch.float64) for s in [(5, 3), (7,), ()]]
    _assert_refused(torch.ops.dlopt.lamb_step, _lamb_args(params, "triton"), ValueError,
                    "backend='triton'.*float64")


def _float64_runs(op, args, steps=3):
    """`steps` calls of `op` on copies of `args` (float64 lists; the last argument, the
    backend, replaced) under backend 'auto', 'cpu' and 'reference': auto gives the cpu
    kernel's bits, and the reference's values within float64 rounding (lists 0, 2, 3,
    4: the params and three state lists). Returns {backend: args}."""
    runs = {}
    for backend in ("auto", "cpu", "reference"):
        a = _clone_args(tuple(args[:-1])) + (backend,)
        for _ in range(steps):
            op(*a)
        runs[backend] = a
    _assert_lists_equal(runs["auto"][:5], runs["cpu"][:5])
    for k in (0, 2, 3, 4):
        for x, y in zip(runs["cpu"][k], runs["reference"][k]):
            torch.testing.assert_close(x, y, **tol(torch.float64))
    return runs


@pytest.mark.skipif(registry.why_unavailable("cpu", "cpu") is not None,
                    reason="needs the C++ CPU library")
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_cpu_kernel_float64(amsgrad):
    """float64 Adam runs the C++ kernel in double under backend='auto' (the same bits as
    backend='cpu'), within float64 rounding of the reference kernel; a call mixing
    float64 with other params, or float64 params with float32 states, is refused
    (TypeError) with nothing changed."""
    params = [torch.randn(s, dtype=torch.float64) for s in [(5, 3), (70001,), (), (0,)]]
    args = list(_adam_args(params, "auto"))
    args[4] = [torch.zeros_like(p) for p in params] if amsgrad else []
    args[12] = amsgrad
    runs = _float64_runs(torch.ops.dlopt.adam_step, args)
    for bad in ([params[0], params[1].float()], None):
        a = _clone_args(tuple(args[:-1])) + ("cpu",)
        if bad is None:  # float32 states of float64 params
            for k in (2, 3, 4):
                if a[k]:
                    a[k][0] = a[k][0].float()
        else:
            a = _adam_args([t.clone() for t in bad], "cpu")
        _assert_refused(torch.ops.dlopt.adam_step, a, TypeError, "float64|Double")


def _adafactor_args(params, backend, state_dtype=None):
    """adafactor_step's arguments for `params` with fresh zero states (torch's layout)."""
    sd = lambda p: state_dtype or p.dtype  # noqa: E731
    fac = [p for p in params if p.dim() >= 2]
    return ([p for p in params], [torch.randn_like(p) for p in params],
            [torch.zeros((*p.shape[:-1], 1), dtype=sd(p)) for p in fac],
            [torch.zeros((*p.shape[:-2], 1, p.shape[-1]), dtype=sd(p)) for p in fac],
            [torch.zeros_like(p, dtype=sd(p)) for p in params if p.dim() < 2], [],
            [torch.zeros(()) for _ in params], torch.tensor(1e-2, dtype=torch.float64), -0.8,
            torch.finfo(params[0].dtype).eps, 1e-3, 1.0, 0.1, False, None, None, None, backend)


@pytest.mark.skipif(registry.why_unavailable("cpu", "cpu") is not None,
                    reason="needs the C++ CPU library")
def test_adafactor_cpu_kernel_float64():
    """float64 Adafactor runs the C++ kernel in double under backend='auto' (the same
    bits as backend='cpu'), within float64 rounding of the float64 oracle and of the
    reference kernel, for factored (batched too), vector, 0-dim and zero-size params; a
    call mixing float64 with float32 params, or float64 params with float32 states, is
    refused (TypeError) with nothing changed."""
    params = [torch.randn(s, dtype=torch.float64)
              for s in [(5, 3), (2, 4, 6), (70001,), (), (0,), (3, 0), (300, 257)]]
    args = _adafactor_args(params, "auto")
    runs = _float64_runs(torch.ops.dlopt.adafactor_step, args)
    for i, p0 in enumerate(params):
        want, *_ = adafactor_float64(p0, [args[1][i]] * 3, lr=1e-2, beta2_decay=-0.8,
                                     eps1=None, eps2=1e-3, d=1.0, weight_decay=0.1,
                                     maximize=False)
        torch.testing.assert_close(runs["cpu"][0][i], want, **tol(torch.float64))
    for bad in (_adafactor_args([params[0].clone(), params[2].float()], "cpu"),
                _adafactor_args([t.clone() for t in params], "cpu", torch.float32)):
        _assert_refused(torch.ops.dlopt.adafactor_step, bad, TypeError, "float64|Double")


@pytest.mark.skipif(registry.why_unavailable("cpu", "cpu") is not None,
                    reason="needs the C++ CPU library")
def test_lamb_cpu_kernel_float64():
    """float64 LAMB runs the C++ kernel in double under backend='auto' (the same bits as
    backend='cpu'), within float64 rounding of the reference kernel, a tensor larger
    than a cache group (recomputing u) included; a call mixing float64 with float32
    params, or float64 params with float32 states, is refused (TypeError) with nothing
    changed."""
    params = [torch.randn(s, dtype=torch.float64)
              for s in [(5, 3), (70001,), (), (0,), (300, 257), (4_300_000,)]]
    _float64_runs(torch.ops.dlopt.lamb_step, _lamb_args(params, "auto"))
    states32 = _lamb_args([t.clone() for t in params[:3]], "cpu")
    states32[2][0], states32[3][0] = states32[2][0].float(), states32[3][0].float()
    for bad in (_lamb_args([params[0].clone(), params[1].float()], "cpu"), states32):
        _assert_refused(torch.ops.dlopt.lamb_step, bad, TypeError, "float64|Double")


@pytest.mark.skipif(registry.why_unavailable("cpu", "cpu") is not None,
                    reason="needs the C++ CPU library")
@pytest.mark.parametrize("op", ["lamb_step", "adafactor_step"])
def test_float64_master_weights_refused_by_cpu_kernel(op):
    """LAMB's and Adafactor's C++ kernels, which take float64 calls since they compute
    in double, refuse master weights for float64 params (naming them), nothing changed."""
    params = [torch.randn(s, dtype=torch.float64) for s in [(5, 3), (70,)]]
    args = list((_lamb_args if op == "lamb_step" else _adafactor_args)(params, "cpu"))
    master_at = 4 if op == "lamb_step" else 5
    args[master_at] = [p.float() for p in params]
    _assert_refused(getattr(torch.ops.dlopt, op), args, (RuntimeError, TypeError), "master")


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_float64_call_rules(backend):
    """Every backend that takes float64 params: master weights are refused for them
    (naming them, nothing changed; the compiled kernel's list checks raise a
    RuntimeError, as for any malformed op call); a stochastic-rounding seed does
    nothing to them (it rounds to bfloat16 only): the same bits as without it."""
    if registry.why_unavailable(backend, "cpu") is not None:
        pytest.skip(f"{backend} cannot run here")
    params = [torch.randn(s, dtype=torch.float64) for s in [(5, 3), (70,)]]
    args = list(_adam_args(params, backend))
    args[5] = [p.float() for p in params]  # master weights
    _assert_refused(torch.ops.dlopt.adam_step, args, (RuntimeError, TypeError), "master")
    plain = list(_clone_args(tuple(args)))
    plain[5] = []
    seeded = list(_clone_args(tuple(plain)))
    seeded[17] = torch.tensor(12345, dtype=torch.int64)
    torch.ops.dlopt.adam_step(*plain)
    torch.ops.dlopt.adam_step(*seeded)
    _assert_lists_equal(plain[:4], seeded[:4])


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_op_steps_complex_as_real_views(backend):
    """A complex call steps the real views exactly as a call on those views does."""
    params = [torch.randn(s, dtype=torch.complex64) for s in [(5, 3), (7,), ()]]
    cx = _adam_args(params, backend)
    real = tuple([torch.view_as_real(t.clone()) if t.is_complex() else t.clone() for t in a]
                 if isinstance(a, list) else a for a in cx)
    torch.ops.dlopt.adam_step(*cx)
    torch.ops.dlopt.adam_step(*real)
    for k in (0, 2, 3, 6):
        for a, b in zip(cx[k], real[k]):
            assert torch.equal(torch.view_as_real(a) if a.is_complex() else a, b)


@pytest.mark.parametrize("entry", ["op", "run_kernel"])
def test_conjugated_views(entry):
    """A conjugated grad is read resolved (the same step as its resolved copy). A
    conjugated param or state cannot be written in place: refused, nothing changed. The
    public op meets the dispatcher's conjugate fallback first (a RuntimeError naming
    the op); the optimizers' direct path and the DTensor rules (`run_kernel`) refuse it
    themselves with a TypeError."""
    from dlopt_kernels.ops._library import run_kernel
    call = (torch.ops.dlopt.adam_step if entry == "op"
            else lambda *a: run_kernel("adam_step", a))
    params = [torch.randn(4, 3, dtype=torch.complex64)]
    plain = list(_adam_args(params, "auto"))
    conj = list(_clone_args(tuple(plain)))
    conj[1] = [plain[1][0].conj().resolve_conj().conj()]  # a lazily conjugated view...
    assert conj[1][0].is_conj() and torch.equal(conj[1][0], plain[1][0])  # ...same values
    call(*plain)
    call(*conj)
    _assert_lists_equal(plain[:4], conj[:4])
    for k in (0, 2):  # a param, a state
        bad = list(_clone_args(tuple(plain)))
        bad[k] = [bad[k][0].conj()]
        exc, match = (RuntimeError, "conjugate") if entry == "op" else (TypeError, "conjugated")
        _assert_refused(call, bad, exc, match)


def test_op_refuses_complex32():
    """complex32 lists are refused naming the dtype."""
    p = [torch.zeros(3, dtype=torch.complex32)]
    with pytest.raises(TypeError, match="complex32"):
        torch.ops.dlopt.sgd_step(p, [torch.zeros_like(p[0])], [], [], torch.tensor(0.1), 0.0,
                                 0.0, 0.0, False, False, [], None, None, None)


def test_op_refuses_complex_for_lion():
    p = [torch.randn(3, dtype=torch.complex64)]
    with pytest.raises(TypeError, match="complex"):
        torch.ops.dlopt.lion_step(p, [torch.randn_like(p[0])], [torch.zeros_like(p[0])], [],
                                  [torch.zeros(())], torch.tensor(1e-3), 0.9, 0.99, 0.0, False,
                                  None, None, None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_opcheck(dtype):
    params = [torch.randn(s, dtype=dtype) for s in [(5, 3), (7,)]]
    torch.library.opcheck(torch.ops.dlopt.adam_step.default, _adam_args(params, "auto"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_skipped_step_changes_nothing(dtype):
    """GradScaler's found_inf skips a float64 / complex step wholly, as any other."""
    params = _params(dtype, "cpu")
    opt = dlopt_optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    states = {k: v.clone() for k, v in opt.state[params[0]].items()}
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    for p, q in zip(params, before):
        assert torch.equal(p, q)
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, states[k]), k


@pytest.mark.parametrize("dtype,backend", [(torch.float64, "inductor"),
                                           (torch.complex64, "aot_eager")])
def test_compiled_step_matches_eager(dtype, backend):
    """A torch.compile(fullgraph=True) step over float64 or complex params gives the
    eager result bit for bit. Complex params compile with backend="aot_eager": Inductor
    fails on the op's mutated complex lists (docs/compat.md, Known issues)."""
    torch._dynamo.reset()
    ps = [nn.Parameter(torch.randn(4, 3, dtype=dtype)), nn.Parameter(torch.randn(5, dtype=dtype))]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    opt, eager = dlopt_optim.AdamW(ps, lr=1e-2), dlopt_optim.AdamW(qs, lr=1e-2)
    step = torch.compile(opt.step, fullgraph=True, backend=backend)
    for _ in range(3):
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        step()
        eager.step()
        for p, q in zip(ps, qs):
            assert torch.equal(p, q)
    assert_same_training(opt, ps, eager, qs, tolerance=dict(rtol=0.0, atol=0.0))
