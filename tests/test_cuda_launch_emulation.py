"""The CUDA launchers of the element-wise optimizers, LAMB and the norm, run on the CPU
and compared with the C++ CPU kernels: bit for bit where both sum nothing (the
element-wise optimizers); LAMB's params within the tolerance table (its trust ratios
come from sums taken in another order; its states and steps bit for bit) and the norms
against a float64 oracle.

csrc/cuda/optim_{adam,sgd,adagrad,lion,rmsprop,lamb}.cu and multi_tensor_norm.cu are
built with -DDLOPT_EMULATE into a host-only shared library
(tests/cuda_emulation/launchers.cu is its C entry point): each kernel launch runs as a
loop over every thread of every block, on CPU tensors, and a block's reduction
(multi_tensor_reduce.cuh block_reduce) in the device's order. So
everything the GPU would do but the device compiler's arithmetic is checked without a
GPU: the per-tensor coefficients and step counts (prepare kernels), the dtype dispatch,
the launch tables (4 KB and 32 KB), the Ops, the storage adapters (bf16 and fp16
rounding, stochastic rounding with the CPU kernels' random bits), master weights,
grad_scale / found_inf and hyperparameters read from memory or passed as values. The
CUDA and CPU kernels share their maths headers, and neither contracts a multiply and an
add that the headers do not name, so the results must agree to the bit.
(The GPU tests compare the real kernels.)
"""
from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys

import pytest
import torch

import dlopt_kernels  # noqa: F401  (registers torch.ops.dlopt)
from conftest import bits
from reference import vector_norms_float64
from tolerances import NORM_TOL, NORM_TOL_P, tol

from dlopt_kernels import _lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from check_cuda import find_nvcc  # noqa: E402

NVCC = find_nvcc()
OPS = ("adam", "sgd", "adagrad", "lion", "rmsprop", "lamb")
MAX_LISTS = 6  # cuda_launch.h kMaxLists
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3,
              torch.int64: 4, torch.int32: 5}
NEAREST, MASTER, STOCHASTIC = 0, 1, 2  # cuda::StoreMode

pytestmark = [pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit), not a GPU"),
              pytest.mark.skipif(not _lib.LOADED["cpu"], reason="needs the C++ CPU library")]


def build_library(path: str) -> ctypes.CDLL:
    """Build the launchers as a host-only library at `path` and load it."""
    srcs = [os.path.join(ROOT, "tests", "cuda_emulation", "launchers.cu")]
    srcs += [os.path.join(ROOT, "csrc", "cuda", f"optim_{op}.cu") for op in OPS + ("adafactor",)]
    srcs.append(os.path.join(ROOT, "csrc", "cuda", "multi_tensor_norm.cu"))
    # as the C++ CPU build: no contraction the headers do not write, and its -march, so
    # that `fmadd` (weight_decay.h) is the same fused multiply-add on both sides
    march = os.environ.get("DLOPT_CPU_ARCH", "native")
    subprocess.run([NVCC, "-std=c++17", "-O1", "--expt-relaxed-constexpr", "-arch=sm_90",
                    "-DDLOPT_EMULATE", "-shared",
                    "-Xcompiler", f"-fPIC,-pthread,-ffp-contract=off,-march={march}",
                    "-diag-suppress", "177", "-I" + os.path.join(ROOT, "csrc", "include"),
                    "-o", path, *srcs], check=True)
    dll = ctypes.CDLL(path)
    dll.dlopt_emulate_step.restype = ctypes.c_int
    dll.dlopt_emulate_norm.restype = ctypes.c_int
    dll.dlopt_emulate_step_shaped.restype = ctypes.c_int
    return dll


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The launchers as a host-only library, loaded with ctypes."""
    return build_library(str(tmp_path_factory.mktemp("emulation") / "libdlopt_emulated.so"))


def _array(ctype, values):
    return (ctype * max(1, len(values)))(*values)


class Scalar:
    """A hyperparameter tensor as the CPU op takes it, and as the launcher's ScalarRef:
    read from memory (a tensor on the GPU) or as the value a CPU tensor gives."""

    def __init__(self, tensor, in_memory):
        self.tensor, self.in_memory = tensor, in_memory

    def ref(self, default):
        t = self.tensor
        if t is None:  # absent: the launcher's default (host half: HostCall::scalar)
            return None, 0, default, int(default)
        if self.in_memory:
            return t.data_ptr(), DTYPE_CODE[t.dtype], 0.0, 0
        return None, 0, float(t.item()), int(t.item())


def run_emulated(dll, op, lists, steps, scalars, store, hp, flags, new_buffer=None):
    """Call the op's launcher on `lists` (its launcher's order; None: absent)."""
    params = lists[0]
    n = len(params)
    ptrs = []
    for i in range(n):
        row = [0] * MAX_LISTS
        if params[i].numel():
            for k, lst in enumerate(lists):
                if lst is not None:
                    row[k] = lst[i].data_ptr()
        ptrs += row
    state_of = lists[2] if len(lists) > 2 and lists[2] is not None else None
    dtypes = []
    for i in range(n):
        dtypes += [DTYPE_CODE[params[i].dtype],
                   DTYPE_CODE[state_of[i].dtype] if state_of is not None else 0]
    # lr, grad_scale, found_inf, sr_seed, global_grad_norm (LAMB): absent ones None
    scalars = list(scalars) + [None] * (5 - len(scalars))
    refs = [(s or Scalar(None, False)).ref(d)
            for s, d in zip(scalars, (0.0, 1.0, 0.0, 0.0, 0.0))]
    err = dll.dlopt_emulate_step(
        op.encode(), n, _array(ctypes.c_void_p, ptrs),
        _array(ctypes.c_int64, [p.numel() for p in params]), _array(ctypes.c_int32, dtypes),
        _array(ctypes.c_uint8, new_buffer or [0] * n),
        _array(ctypes.c_void_p, [s.data_ptr() for s in steps]) if steps else None,
        _array(ctypes.c_uint8, [s.dtype == torch.float64 for s in steps] or [0]),
        _array(ctypes.c_void_p, [r[0] for r in refs]), _array(ctypes.c_int32, [r[1] for r in refs]),
        _array(ctypes.c_double, [r[2] for r in refs]), ctypes.c_int64(refs[3][3]),
        ctypes.c_int32(store), _array(ctypes.c_double, hp), _array(ctypes.c_int32, flags))
    assert err == 0, f"{op} launcher returned cudaError {err}"


# ---------------------------------------------------------------------------- inputs

SHAPES = [(1,), (4097,), (3, 33), (0,), (70001,), (8, 8)]  # 70001: chunks of 64K and a tail
PRECISIONS = {  # name: (param dtype, state dtype, store)
    "fp32": (torch.float32, torch.float32, NEAREST),
    "bf16": (torch.bfloat16, torch.float32, NEAREST),
    "bf16_states": (torch.bfloat16, torch.bfloat16, NEAREST),
    "bf16_sr": (torch.bfloat16, torch.float32, STOCHASTIC),
    "bf16_master": (torch.bfloat16, torch.float32, MASTER),
    "fp16_states": (torch.float16, torch.float16, NEAREST),
    "fp16_master": (torch.float16, torch.float32, MASTER),
}


def make_inputs(precision, n_states, positive=()):
    """params, grads, n_states state lists, masters, steps (count 3), seeded values; the
    state lists named in `positive` hold squares (Adam's exp_avg_sq, ...)."""
    pdt, sdt, store = PRECISIONS[precision]
    params, grads, masters = [], [], []
    states = [[] for _ in range(n_states)]
    for shape in SHAPES:
        p32 = torch.randn(shape)
        params.append(p32.to(pdt))
        grads.append(torch.randn(shape).to(pdt))
        masters.append(p32.clone() if store == MASTER else None)
        for k in range(n_states):
            s = torch.randn(shape)
            states[k].append((s * s if k in positive else s * 0.1).to(sdt))
    steps = [torch.full((), 3.0) for _ in SHAPES]
    masters = [m for m in masters if m is not None]
    return params, grads, states, masters, steps, store


def clone(lists):
    return [None if lst is None else [t.clone() for t in lst] for lst in lists]


def assert_same(name, got, want):
    for k, (g, w) in enumerate(zip(got, want)):
        if g is None:
            continue
        for i, (a, b) in enumerate(zip(g, w)):
            assert torch.equal(bits(a), bits(b)), (
                f"{name}: list {k}, tensor {i} (shape {tuple(a.shape)}) differs from the CPU "
                f"kernel's bits: max |diff| {(a.double() - b.double()).abs().max().item():g}")


def gradscaler_inputs(case):
    """(grad_scale, found_inf) tensors for a case: none, a scale, or a found inf."""
    if case == "plain":
        return None, None
    if case == "scaled":
        return torch.tensor(512.0), torch.tensor(0.0)
    return torch.tensor(512.0), torch.tensor(1.0)  # "found_inf": nothing may change


CASES = ["plain", "scaled", "found_inf"]


# ------------------------------------------------------------------------------ ops


def _sr_seed(store):
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if store == STOCHASTIC else None


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("variant", ["adamw", "adam_l2_amsgrad_maximize", "adam_no_wd"])
def test_adam_launcher_matches_cpu_kernel(emulated, variant, precision, case):
    params, grads, (m, v, vmax), masters, steps, store = make_inputs(
        precision, 3, positive=(1, 2))
    amsgrad = "amsgrad" in variant
    maximize = "maximize" in variant
    decoupled = variant == "adamw"
    wd = 0.0 if variant == "adam_no_wd" else 0.05
    beta1, beta2, eps = 0.9, 0.99, 1e-6
    lr = torch.tensor(3e-3, dtype=torch.float64)
    gs, fi = gradscaler_inputs(case)
    seed = _sr_seed(store)
    # (CPU op list order) params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps
    want = clone([params, grads, m, v, vmax, masters, steps])
    torch.ops.dlopt.adam_step(want[0], want[1], want[2], want[3], want[4] if amsgrad else [],
                              want[5], want[6], lr, beta1, beta2, wd, eps, amsgrad, maximize,
                              decoupled, gs, fi, seed, "cpu")
    got = clone([params, grads, m, v, vmax, masters, steps])
    run_emulated(emulated, "adam",
                 [got[0], got[1], got[2], got[3], got[4] if amsgrad else None, got[5] or None],
                 got[6], [Scalar(lr, case == "scaled"), Scalar(gs, True), Scalar(fi, True),
                          Scalar(seed, case != "plain")],
                 store, [beta1, beta2, wd, eps], [amsgrad, maximize, decoupled])
    assert_same(f"adam {variant} {precision} {case}", got, want)
    if case == "found_inf":
        assert_same("found_inf leaves everything", got, clone([params, grads, m, v, vmax,
                                                               masters, steps]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("variant", ["momentum_nesterov_wd", "momentum_dampening_new_buffers",
                                     "plain_maximize"])
def test_sgd_launcher_matches_cpu_kernel(emulated, variant, precision, case):
    params, grads, (bufs,), masters, _, store = make_inputs(precision, 1)
    momentum = 0.0 if variant.startswith("plain") else 0.9
    nesterov = "nesterov" in variant
    dampening = 0.1 if "dampening" in variant else 0.0
    wd = 0.01 if "wd" in variant else 0.0
    maximize = "maximize" in variant
    new = [i % 2 == 0 for i in range(len(params))] if "new_buffers" in variant else []
    lr = torch.tensor(0.05, dtype=torch.float64)
    gs, fi = gradscaler_inputs(case)
    seed = _sr_seed(store)
    want = clone([params, grads, bufs, masters])
    torch.ops.dlopt.sgd_step(want[0], want[1], want[2] if momentum else [], want[3], lr, wd,
                             momentum, dampening, nesterov, maximize, new, gs, fi, seed, "cpu")
    got = clone([params, grads, bufs, masters])
    run_emulated(emulated, "sgd", [got[0], got[1], got[2] if momentum else None, got[3] or None],
                 [], [Scalar(lr, case == "scaled"), Scalar(gs, True), Scalar(fi, True),
                      Scalar(seed, case != "plain")],
                 store, [wd, momentum, dampening], [nesterov, maximize],
                 new_buffer=[int(b) for b in new] if new and momentum else None)
    assert_same(f"sgd {variant} {precision} {case}", got, want)


# the ops of one state list: (CPU op, hyperparameters, the state's values are squares)
ONE_STATE = {"adagrad": (torch.ops.dlopt.adagrad_step, [0.01, 0.02, 1e-10], True),  # lr_decay, wd, eps
             "lion": (torch.ops.dlopt.lion_step, [0.9, 0.99, 0.1], False)}  # beta1, beta2, wd


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("op", list(ONE_STATE))
def test_one_state_launchers_match_cpu_kernel(emulated, op, precision, case):
    cpu_op, hp, squares = ONE_STATE[op]
    params, grads, (state,), masters, steps, store = make_inputs(
        precision, 1, positive=(0,) if squares else ())
    lr = torch.tensor(0.02, dtype=torch.float64)
    maximize = case == "scaled"
    gs, fi = gradscaler_inputs(case)
    seed = _sr_seed(store)
    want = clone([params, grads, state, masters, steps])
    cpu_op(want[0], want[1], want[2], want[3], want[4], lr, *hp, maximize, gs, fi, seed, "cpu")
    got = clone([params, grads, state, masters, steps])
    in_memory = op == "adagrad"  # lr and the seed read from memory, or passed as values
    run_emulated(emulated, op, [got[0], got[1], got[2], got[3] or None], got[4],
                 [Scalar(lr, in_memory), Scalar(gs, True), Scalar(fi, True),
                  Scalar(seed, in_memory)], store, hp, [maximize])
    assert_same(f"{op} {precision} {case}", got, want)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("variant", ["centered_momentum", "plain"])
def test_rmsprop_launcher_matches_cpu_kernel(emulated, variant, precision, case):
    params, grads, (sq, ga, bufs), masters, steps, store = make_inputs(
        precision, 3, positive=(0,))
    centered = momentum = variant == "centered_momentum"
    if centered:  # square_avg above grad_avg^2, as a run keeps it
        sq = [(s.float() + g.float() ** 2 + 0.1).to(s.dtype) for s, g in zip(sq, ga)]
    mom = 0.9 if momentum else 0.0
    lr = torch.tensor(0.01, dtype=torch.float64)
    alpha, eps, wd, maximize = 0.99, 1e-8, 0.01, case == "scaled"
    gs, fi = gradscaler_inputs(case)
    seed = _sr_seed(store)
    want = clone([params, grads, sq, ga, bufs, masters, steps])
    torch.ops.dlopt.rmsprop_step(want[0], want[1], want[2], want[3] if centered else [],
                                 want[4] if momentum else [], want[5], want[6], lr, alpha, eps,
                                 wd, mom, centered, maximize, gs, fi, seed, "cpu")
    got = clone([params, grads, sq, ga, bufs, masters, steps])
    run_emulated(emulated, "rmsprop",
                 [got[0], got[1], got[2], got[3] if centered else None,
                  got[4] if momentum else None, got[5] or None], got[6],
                 [Scalar(lr, True), Scalar(gs, True), Scalar(fi, True), Scalar(seed, True)],
                 store, [alpha, eps, wd, mom], [centered, maximize])
    assert_same(f"rmsprop {variant} {precision} {case}", got, want)


@pytest.mark.parametrize("small_tables", [False, True], ids=["32KB", "4KB"])
def test_many_tensors_in_several_tables(emulated, small_tables, monkeypatch):
    """~600 tensors: more than one table of either size (60 / 498 of Adam's slots), so
    launches are cut where the CPU kernel runs one loop."""
    if small_tables:
        monkeypatch.setenv("DLOPT_CUDA_SMALL_TABLES", "1")
    sizes = torch.randint(1, 3000, (600,)).tolist()
    params = [torch.randn(n) for n in sizes]
    grads = [torch.randn(n) for n in sizes]
    m = [torch.randn(n) * 0.1 for n in sizes]
    v = [torch.rand(n) for n in sizes]
    steps = [torch.full((), float(i % 5)) for i in range(len(sizes))]
    lr = torch.tensor(1e-3, dtype=torch.float64)
    want = clone([params, grads, m, v, steps])
    torch.ops.dlopt.adam_step(want[0], want[1], want[2], want[3], [], [], want[4], lr, 0.9,
                              0.999, 0.01, 1e-8, False, False, True, None, None, None, "cpu")
    got = clone([params, grads, m, v, steps])
    run_emulated(emulated, "adam", [got[0], got[1], got[2], got[3], None, None], got[4],
                 [Scalar(lr, False), None, None, None], NEAREST, [0.9, 0.999, 0.01, 1e-8],
                 [False, False, True])
    assert_same(f"adam, 600 tensors, {'4 KB' if small_tables else '32 KB'} tables", got, want)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("variant", ["wd_bias_correction", "clipped_no_wd",
                                     "clipped_no_bias_correction"])
def test_lamb_launcher_matches_cpu_kernel(emulated, variant, precision, case):
    """LAMB's four phases (prepare, moments with the per-chunk sums of p^2 and u^2,
    per-tensor trust ratios from those sums, apply): states and steps bit for bit,
    params within the tolerance table (the CPU kernel sums the squares in another
    order, so a trust ratio may differ in its last bits)."""
    params, grads, (m, v), masters, steps, store = make_inputs(precision, 2, positive=(1,))
    wd = 0.0 if "no_wd" in variant else 0.01
    bias_correction = "no_bias_correction" not in variant
    max_norm = 1.0 if "clipped" in variant else 0.0
    beta1, beta2, eps = 0.9, 0.99, 1e-6
    lr = torch.tensor(3e-3, dtype=torch.float64)
    gs, fi = gradscaler_inputs(case)
    gn = torch.tensor(7.5) if max_norm else None  # above max_norm (clips) once unscaled
    seed = _sr_seed(store)
    want = clone([params, grads, m, v, masters, steps])
    torch.ops.dlopt.lamb_step(want[0], want[1], want[2], want[3], want[4], want[5], lr, beta1,
                              beta2, wd, eps, bias_correction, max_norm, gn, gs, fi, seed, "cpu")
    got = clone([params, grads, m, v, masters, steps])
    run_emulated(emulated, "lamb", [got[0], got[1], got[2], got[3], got[4] or None], got[5],
                 [Scalar(lr, case != "plain"), Scalar(gs, True), Scalar(fi, True),
                  Scalar(seed, True), Scalar(gn, case == "scaled")],
                 store, [beta1, beta2, wd, eps, max_norm], [bias_correction])
    name = f"lamb {variant} {precision} {case}"
    assert_same(name, got[1:4] + got[5:], want[1:4] + want[5:])
    for k in (0, 4):  # params, masters
        for a, b in zip(got[k] or [], want[k] or []):
            torch.testing.assert_close(a, b, **tol(a.dtype), msg=lambda m: f"{name}: {m}")
    if case == "found_inf":
        assert_same("found_inf leaves everything", got, clone([params, grads, m, v, masters,
                                                               steps]))


# Adafactor: vectors (300001: three items of kItemElems = 131072 elements), matrices
# cut into several items ((300, 600): items of 218 and 82 rows, each split into 8 parts
# of rows whose column sums meet in atomics; (40, 7000): three items of 18, 18 and 4
# rows, parts of 3 rows or none), a batch of matrices, zero-size ones. (Every row costs
# the emulation a warp's worth of shuffles: the shapes keep rows few.)
AF_SHAPES = [(1,), (4097,), (3, 33), (0,), (300001,), (8, 8), (2, 5, 300), (300, 600),
             (40, 7000), (0, 7)]


def adafactor_inputs(precision, shapes):
    """params, grads, row_vars, col_vars, variances (positive), masters, steps, store."""
    pdt, sdt, store = PRECISIONS[precision]
    params, grads, rows, cols, variances, masters = [], [], [], [], [], []
    for shape in shapes:
        p32 = torch.randn(shape)
        params.append(p32.to(pdt))
        grads.append(torch.randn(shape).to(pdt))
        if store == MASTER:
            masters.append(p32.clone())
        if len(shape) >= 2:
            rows.append(torch.rand(shape[:-1] + (1,)).to(sdt))
            cols.append(torch.rand(shape[:-2] + (1, shape[-1])).to(sdt))
        else:
            variances.append(torch.rand(shape).to(sdt))
    steps = [torch.full((), 3.0) for _ in shapes]
    return params, grads, rows, cols, variances, masters, steps, store


def run_emulated_adafactor(dll, lists, scalars, store, hp, maximize):
    """Adafactor's launcher on CPU tensors (lists as the CPU op takes them)."""
    params, grads, rows, cols, variances, masters, steps = lists
    ptrs, numels, r, c, dtypes = [], [], [], [], []
    kf = kv = 0
    for i, p in enumerate(params):
        row = [0] * MAX_LISTS
        factored = p.dim() >= 2
        k = kf if factored else kv
        kf, kv = kf + factored, kv + (not factored)
        state = rows[k] if factored else variances[k]
        if p.numel():
            row[0], row[1] = p.data_ptr(), grads[i].data_ptr()
            if factored:
                row[2], row[3] = rows[k].data_ptr(), cols[k].data_ptr()
            else:
                row[4] = variances[k].data_ptr()
            if masters:
                row[5] = masters[i].data_ptr()
        ptrs += row
        numels.append(p.numel())
        r.append(p.shape[-2] if factored else 0)
        c.append(p.shape[-1] if factored else 0)
        dtypes += [DTYPE_CODE[p.dtype], DTYPE_CODE[state.dtype]]
    refs = [(sc or Scalar(None, False)).ref(d) for sc, d in zip(scalars, (0.0, 1.0, 0.0, 0.0))]
    err = dll.dlopt_emulate_step_shaped(
        b"adafactor", len(params), _array(ctypes.c_void_p, ptrs), _array(ctypes.c_int64, numels),
        _array(ctypes.c_int64, r), _array(ctypes.c_int64, c), _array(ctypes.c_int32, dtypes),
        _array(ctypes.c_void_p, [s.data_ptr() for s in steps]),
        _array(ctypes.c_uint8, [s.dtype == torch.float64 for s in steps]),
        _array(ctypes.c_void_p, [x[0] for x in refs]), _array(ctypes.c_int32, [x[1] for x in refs]),
        _array(ctypes.c_double, [x[2] for x in refs]), ctypes.c_int64(refs[3][3]),
        ctypes.c_int32(store), _array(ctypes.c_double, hp), _array(ctypes.c_int32, [maximize]))
    assert err == 0, f"adafactor launcher returned cudaError {err}"


def _adafactor_case(dll, precision, case, shapes, wd, maximize):
    lists = adafactor_inputs(precision, shapes)
    *tensors, store = lists
    lr = torch.tensor(1e-2, dtype=torch.float64)
    gs, fi = gradscaler_inputs(case)
    seed = _sr_seed(store)
    hp = [-0.8, 1e-3, 1e-3, 1.0, wd]  # beta2_decay, eps1, eps2, d, weight_decay
    want = clone(tensors)
    torch.ops.dlopt.adafactor_step(*want, lr, *hp, maximize, gs, fi, seed, "cpu")
    got = clone(tensors)
    run_emulated_adafactor(dll, got, [Scalar(lr, case != "plain"), Scalar(gs, True),
                                      Scalar(fi, True), Scalar(seed, True)], store, hp, maximize)
    name = f"adafactor {precision} {case}"
    assert_same(name + " steps", [got[-1]], [want[-1]])
    # the sums of squares meet in another order than the CPU kernel's (fp64 atomics)
    for k, what in enumerate(("params", "grads", "row_vars", "col_vars", "variances",
                              "masters")):
        for a, b in zip(got[k], want[k]):
            torch.testing.assert_close(a, b, **tol(a.dtype), msg=lambda m: f"{name} {what}: {m}")
    if case == "found_inf":
        assert_same("found_inf leaves everything", got, clone(tensors))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_adafactor_launcher_matches_cpu_kernel(emulated, precision, case):
    """Adafactor's launcher and its five kernels (prepare; stats: row sums by warps,
    column and p^2 sums by atomics; factors; direction; apply), the kernel bodies run
    as emulated CUDA threads (cuda_threads.cuh: barriers for __syncthreads and the warp
    shuffles, a mutex for the atomics): steps bit for bit, the rest within the tolerance
    table of the C++ CPU kernel."""
    _adafactor_case(emulated, precision, case, AF_SHAPES, wd=0.01 if case != "plain" else 0.0,
                    maximize=case == "scaled")


def test_adafactor_launcher_with_many_tensors(emulated):
    """30 tensors: three tables of at most 14 tensors per launch (and 120 items)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    shapes = []
    for i in range(30):
        a, b = (int(x) for x in torch.randint(1, 40, (2,), generator=gen))
        shapes.append((a, b) if i % 3 else (a * b,))
    _adafactor_case(emulated, "fp32", "plain", shapes, wd=0.0, maximize=False)


def run_emulated_norm(dll, tensors, ord):
    """multi_tensor_norm's launcher on `tensors`: (norms, total), fp32."""
    n = len(tensors)
    norms, total = torch.full((n,), float("nan")), torch.full((), float("nan"))
    err = dll.dlopt_emulate_norm(
        n, _array(ctypes.c_void_p, [t.data_ptr() if t.numel() else 0 for t in tensors]),
        _array(ctypes.c_int64, [t.numel() for t in tensors]),
        _array(ctypes.c_int32, [DTYPE_CODE[t.dtype] for t in tensors]), ctypes.c_double(ord),
        ctypes.c_void_p(norms.data_ptr()), ctypes.c_void_p(total.data_ptr()))
    assert err == 0, f"norm launcher returned cudaError {err}"
    return norms, total


@pytest.mark.parametrize("ord", [2.0, 1.0, math.inf, -math.inf, 0.0, 3.0])
@pytest.mark.parametrize("many", [False, True], ids=["mixed", "600_tensors"])
def test_norm_launcher_matches_float64(emulated, many, ord, monkeypatch):
    """The norm's three phases (per-chunk partials, per-tensor segments, the total):
    mixed dtypes, zero-size and multi-chunk tensors, or 600 tensors (more than one
    segment launch of 448, and 4 KB tables: several reduce launches)."""
    if many:
        monkeypatch.setenv("DLOPT_CUDA_SMALL_TABLES", "1")
        tensors = [torch.randn(n) for n in torch.randint(0, 3000, (600,)).tolist()]
    else:
        dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
        tensors = [torch.randn(shape).to(dtypes[i % 4]) for i, shape in enumerate(
            [(70001,), (1,), (0,), (3, 33), (4097,), (200001,), (8, 8), (5,)])]
    norms, total = run_emulated_norm(emulated, tensors, ord)
    want_norms, want_total = vector_norms_float64(tensors, ord)
    t = NORM_TOL_P if ord not in (2.0, 1.0, math.inf, -math.inf, 0.0) else NORM_TOL
    torch.testing.assert_close(norms.double(), want_norms, **t)
    torch.testing.assert_close(total.double(), want_total, **t)


def test_unknown_op_is_refused(emulated):
    """The entry point names the launcher it runs; any other name is refused (-1), no
    launcher is called."""
    p = torch.zeros(3)
    before = p.clone()
    run = emulated.dlopt_emulate_step
    zero = _array(ctypes.c_int64, [3])
    assert run(b"adamw_typo", 1, _array(ctypes.c_void_p, [p.data_ptr()] + [0] * 5), zero,
               _array(ctypes.c_int32, [0, 0]), _array(ctypes.c_uint8, [0]), None,
               _array(ctypes.c_uint8, [0]), _array(ctypes.c_void_p, [0] * 4),
               _array(ctypes.c_int32, [0] * 4), _array(ctypes.c_double, [0.1, 1, 0, 0]),
               ctypes.c_int64(0), ctypes.c_int32(0), _array(ctypes.c_double, [0.0] * 4),
               _array(ctypes.c_int32, [0] * 3)) == -1
    shaped = emulated.dlopt_emulate_step_shaped  # Adafactor's entry: that launcher only
    assert shaped(b"adam", 1, _array(ctypes.c_void_p, [p.data_ptr()] + [0] * 5), zero,
                  _array(ctypes.c_int64, [0]), _array(ctypes.c_int64, [0]),
                  _array(ctypes.c_int32, [0, 0]), _array(ctypes.c_void_p, [0]),
                  _array(ctypes.c_uint8, [0]), _array(ctypes.c_void_p, [0] * 4),
                  _array(ctypes.c_int32, [0] * 4), _array(ctypes.c_double, [0.1, 1, 0, 0]),
                  ctypes.c_int64(0), ctypes.c_int32(0), _array(ctypes.c_double, [0.0] * 5),
                  _array(ctypes.c_int32, [0])) == -1
    assert torch.equal(p, before)
