"""The Triton backend's multi-tensor launches (triton/_common.py multi_tensor_groups):
one launch per dtype group, addresses from a table cached by content. Judged against
the reference backend, which updates each tensor on its own."""
from __future__ import annotations

import pytest
import torch

from conftest import device_backends
from dlopt_kernels import _lib
from tolerances import NORM_TOL, NORM_TOL_P, tol

pytestmark = pytest.mark.skipif(
    not any(b == "triton" for _, b in device_backends()), reason="triton backend unavailable")
DEVICES = sorted({d for d, b in device_backends() if b == "triton"})
op = torch.ops.dlopt.adam_step
needs_cpp = pytest.mark.skipif(not _lib.LOADED["cpu"], reason="the C++ library did not load")


def _lists(device, shapes_dtypes):
    ps = [torch.randn(s, device=device).to(dt) for s, dt in shapes_dtypes]
    return dict(params=ps, grads=[torch.randn_like(p) for p in ps],
                m=[torch.randn_like(p).abs() for p in ps], v=[torch.rand_like(p) for p in ps],
                steps=[torch.full((), 3.0, device=device) for _ in ps])


def _clone(lists):
    return {k: [t.clone() for t in v] for k, v in lists.items()}


def _assert_lists_close(got, want, keys):
    """Every tensor of got[key] close to want[key] at its dtype's tolerance."""
    for key in keys:
        for a, b in zip(got[key], want[key]):
            torch.testing.assert_close(a, b, **tol(a.dtype))


def _step(lists, backend, sr_seed=None):
    op(lists["params"], lists["grads"], lists["m"], lists["v"], [], [], lists["steps"],
       torch.tensor(1e-2, dtype=torch.float64), 0.9, 0.999, 0.01, 1e-8, False, False, True,
       None, None, sr_seed, backend)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_and_empty_tensors_in_one_call(device):
    """fp32, bf16 and fp16 params (three groups) and zero-size ones, interleaved: each
    tensor updated as on its own, each step counted."""
    spec = [((70001,), torch.float32), ((0,), torch.float32), ((33, 7), torch.bfloat16),
            ((5,), torch.float16), ((2, 0), torch.bfloat16), ((1,), torch.float32),
            ((4097,), torch.float16)]
    got = _lists(device, spec)
    want = _clone(got)
    _step(got, "triton")
    _step(want, "reference")
    _assert_lists_close(got, want, ("params", "m", "v", "steps"))


@pytest.mark.parametrize("device", DEVICES)
def test_new_tensors_get_a_new_table(device):
    """Tensors of the same shapes but other storage after a cached call: the new ones
    are updated and the old ones left alone (no stale addresses)."""
    spec = [((300,), torch.float32), ((17, 3), torch.float32)]
    first = _lists(device, spec)
    _step(first, "triton")
    _step(first, "triton")  # a cache hit: same tensors
    before = _clone(first)
    second = _lists(device, spec)
    want = _clone(second)
    _step(second, "triton")
    _step(want, "reference")
    _assert_lists_close(second, want, ("params", "m", "v"))
    for key in ("params", "m", "v"):
        for a, b in zip(first[key], before[key]):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("device", DEVICES)
def test_sr_bits_follow_the_tensor_index(device):
    """Stochastic rounding keys on each tensor's index in the op's lists, also when
    zero-size tensors and another dtype's group sit between: the same bits as the
    reference backend."""
    spec = [((0,), torch.bfloat16), ((5000,), torch.float32), ((3000,), torch.bfloat16),
            ((2500,), torch.bfloat16)]
    got = _lists(device, spec)
    want = _clone(got)
    seed = torch.tensor(1234, dtype=torch.int64)
    _step(got, "triton", seed)
    _step(want, "reference", seed)
    for a, b in zip(got["params"][2:], want["params"][2:]):
        assert (a.view(torch.int16) != b.view(torch.int16)).float().mean() <= 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_lamb_trust_ratio_per_tensor_across_groups(device):
    """LAMB's per-tensor norms come from each tensor's own slots, also when dtype groups,
    ALIGNED and unaligned groups (whole vectors, odd sizes, an odd offset) and zero-size
    tensors interleave (the slots of all groups sit side by side)."""
    spec = [((3000,), torch.bfloat16), ((0,), torch.float32), ((70001,), torch.float32),
            ((40, 9), torch.bfloat16), ((5,), torch.float32), ((4096,), torch.float32),
            ((4096,), torch.float32)]
    got = _lists(device, spec)
    got["params"][6] = torch.randn(4097, device=device)[1:]  # not 16-byte aligned
    want = _clone(got)
    for lists, backend in ((got, "triton"), (want, "reference")):
        torch.ops.dlopt.lamb_step(lists["params"], lists["grads"], lists["m"], lists["v"], [],
                                  lists["steps"], torch.tensor(1e-2, dtype=torch.float64), 0.9,
                                  0.999, 0.01, 1e-6, True, 0.0, None, None, None, None, backend)
    _assert_lists_close(got, want, ("params", "m", "v", "steps"))


@pytest.mark.parametrize("ord", [2.0, float("inf"), 0.0, 3.0])
@pytest.mark.parametrize("device", DEVICES)
def test_norm_per_tensor_across_groups(device, ord):
    """multi_tensor_norm's per-tensor norms come from each tensor's own slots with dtype
    groups, ALIGNED and unaligned groups and zero-size tensors interleaved (the groups'
    slots side by side)."""
    xs = [torch.randn(3000, device=device).bfloat16(), torch.empty(0, device=device),
          torch.randn(70001, device=device), torch.randn(40, 9, device=device).half(),
          torch.randn(5, device=device).double(), torch.randn(2500, device=device).bfloat16(),
          torch.randn(4097, device=device)[1:], torch.randn(64, device=device).double()]
    got = torch.ops.dlopt.multi_tensor_norm(xs, ord, "triton")
    want = torch.ops.dlopt.multi_tensor_norm(xs, ord, "reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **(NORM_TOL_P if ord == 3.0 else NORM_TOL))


def _adafactor_lists(device, shapes_dtypes):
    """Adafactor's lists: row/col variances for >= 2-D params, a variance for the rest
    (fp32 states: what the optimizer keeps for bf16 params under stochastic rounding)."""
    ps = [torch.randn(s, device=device).to(dt) for s, dt in shapes_dtypes]
    factored = [p for p in ps if p.dim() >= 2]
    return dict(params=ps, grads=[torch.randn_like(p) for p in ps],
                row=[torch.rand(p.shape[:-1] + (1,), device=device) for p in factored],
                col=[torch.rand(p.shape[:-2] + (1,) + p.shape[-1:], device=device)
                     for p in factored],
                var=[torch.rand(p.shape, device=device) for p in ps if p.dim() < 2],
                steps=[torch.full((), 2.0, device=device) for _ in ps])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sr", [False, True])
def test_adafactor_groups_in_one_launch(device, sr):
    """Adafactor's 0-/1-D tensors and its matrices each go through one launch per dtype
    group and kernel, in one call: biases and matrices (3-D ones too) of two dtypes and
    zero-size tensors interleaved, with weight decay (and stochastic rounding of the
    bf16 ones): each tensor updated as the reference updates it, with the same SR bits."""
    spec = [((300,), torch.float32), ((0,), torch.bfloat16), ((17, 9), torch.float32),
            ((), torch.float32), ((4099,), torch.bfloat16), ((3, 5, 6), torch.bfloat16),
            ((1,), torch.bfloat16), ((70001,), torch.float32), ((2, 70, 33), torch.float32),
            ((0, 4), torch.float32), ((1, 1), torch.float32), ((40, 3), torch.bfloat16)]
    got = _adafactor_lists(device, spec)
    want = _clone(got)
    seed = torch.tensor(99, dtype=torch.int64) if sr else None
    for lists, backend in ((got, "triton"), (want, "reference")):
        torch.ops.dlopt.adafactor_step(
            lists["params"], lists["grads"], lists["row"], lists["col"], lists["var"], [],
            lists["steps"], torch.tensor(1e-2, dtype=torch.float64), -0.8, 1e-30, 1e-3, 1.0,
            0.05, False, None, None, seed, backend)
    _assert_lists_close(got, want, ("params", "row", "col", "var", "steps"))


def test_vector_ready_needs_alignment_and_whole_vectors():
    """ALIGNED (16-byte vector accesses when compiled) only for tensors whose every
    element-wise list is 16-byte aligned and whose numel is a multiple of 8; a step
    tensor (one element) does not count."""
    from dlopt_kernels.triton._common import vector_ready
    base = torch.zeros(64)
    aligned, odd_size, offset = base[:16], base[:12], base[1:17]
    step = torch.zeros(8)[1:2]  # misaligned, but one element: not element-wise
    assert vector_ready([[aligned], [aligned.clone()], [step]], 0)
    assert not vector_ready([[odd_size], [odd_size.clone()]], 0)
    assert not vector_ready([[aligned], [offset]], 0)
    assert not vector_ready([[offset], [aligned]], 0)
    assert vector_ready([[aligned], []], 0)  # an absent list


@pytest.mark.parametrize("device", DEVICES)
def test_aligned_and_unaligned_groups_in_one_call(device):
    """Whole-vector tensors (numel a multiple of 8, aligned), odd sizes and views at an
    odd offset in one call: they take different launches (ALIGNED or not), and each
    tensor is updated as on its own."""
    store = torch.randn(4100, device=device)
    spec = [((4096,), torch.float32), ((4097,), torch.float32), ((24, 8), torch.bfloat16),
            ((9,), torch.bfloat16), ((16,), torch.float16)]
    got = _lists(device, spec)
    got["params"][1] = store[1:4098]  # an odd offset: not 16-byte aligned
    want = _clone(got)
    _step(got, "triton")
    _step(want, "reference")
    _assert_lists_close(got, want, ("params", "m", "v"))


def _native_and_python_groups(lists, mutated, key_lists, extra, chunk, elementwise, monkeypatch):
    """elementwise_groups through _C.triton_tables and through the Python twin
    (DLOPT_TRITON_PY_TABLES=1), each with the host copies of its tables."""
    from dlopt_kernels.triton import _common
    out = []
    for py in ("0", "1"):
        monkeypatch.setenv("DLOPT_TRITON_PY_TABLES", py)
        _common._TABLE_CACHE.clear()
        groups, writeback, keep = _common.elementwise_groups(
            lists, mutated, key_lists, extra, chunk, torch.device("cpu"), elementwise)
        out.append(([(d, c, al, t.tolist(), m.tolist(), n) for d, c, al, t, m, n in groups],
                     len(writeback), keep))
    return out


@needs_cpp
@pytest.mark.parametrize("chunk", [8, 1000, 65536])
def test_native_tables_match_the_python_twin(chunk, monkeypatch):
    """_C.triton_tables builds the same groups (keys, ALIGNED, rows, program maps) as
    multi_tensor_groups over mixed dtypes, odd sizes and offsets, zero-size params, an
    absent list, per-param extra codes and a step list; with a transposed grad both
    first make the same scratch copy (and keep it alive for the launch)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    store = torch.randn(5000)
    spec = [(4096, torch.float32), (0, torch.float32), (4097, torch.float32),
            (24, torch.bfloat16), (9, torch.float16), (16, torch.bfloat16), (1, torch.float32)]
    params = [torch.randn(n, generator=g).to(dt) for n, dt in spec]
    params.append(store[3:4099])  # an odd offset
    grads = [torch.randn_like(p) for p in params]
    states = [torch.zeros_like(p, dtype=torch.float32 if i % 2 else p.dtype)
              for i, p in enumerate(params)]
    steps = [torch.zeros((), dtype=torch.float64 if i % 3 else torch.float32)
             for i in range(len(params))]
    extra = [int(x) for x in torch.randint(0, 2, (len(params),), generator=g)]
    lists = [params, grads, states, [], steps]
    mutated = (True, False, True, True, False)
    (nat, nat_wb, _), (py, py_wb, _) = _native_and_python_groups(
        lists, mutated, (0, 2, 4), extra, chunk, 4, monkeypatch)
    assert nat == py and nat_wb == py_wb == 0
    assert len(nat) >= 4  # dtype groups, split by extra code and alignment
    # a transposed grad: both paths copy it into the param's layout first
    p2 = torch.randn(6, 10)
    grads2 = [torch.randn(10, 6).t()]
    (nat, nat_wb, nat_keep), (py, py_wb, py_keep) = _native_and_python_groups(
        [[p2], grads2, [torch.zeros_like(p2)]], (True, False, True), (0, 2), None, chunk, 3,
        monkeypatch)
    assert nat_wb == py_wb == 0  # grads are read only: nothing to write back
    for keep in (nat_keep, py_keep):
        assert keep[1][0].is_contiguous() and torch.equal(keep[1][0], grads2[0])
    strip = [(d, c, al, t[:1] + t[2:3], m, n) for d, c, al, t, m, n in nat]  # no addresses
    assert strip == [(d, c, al, t[:1] + t[2:3], m, n) for d, c, al, t, m, n in py]


@needs_cpp
def test_native_tables_refuse_what_they_cannot_read():
    """None (the Python path decides, with its errors) for a tensor subclass, a list of
    another length or an unsupported dtype; a ValueError for a chunk below 1."""
    from dlopt_kernels import _C

    class Sub(torch.Tensor):
        pass

    p = torch.zeros(8)
    assert _C.triton_tables([[p], [p]], (0,), None, 8) is not None
    assert _C.triton_tables([[p.as_subclass(Sub)], [p]], (0,), None, 8) is None
    assert _C.triton_tables([[p], [p, p]], (0,), None, 8) is None
    assert _C.triton_tables([[p.long()], [p]], (0,), None, 8) is None
    assert _C.triton_tables([[p], [p]], (0,), [0, 1], 8) is None  # extra of another length
    with pytest.raises(ValueError, match="chunk"):
        _C.triton_tables([[p]], (0,), None, 0)
    assert _C.triton_tables([[p]], (3,), None, 8) is None  # a key list out of range
    assert _C.triton_tables([[p], "grads"], (0,), None, 8) is None  # not a list
    assert _C.triton_tables([[], []], (0,), None, 8) == (True, [])  # no params
    for bad in (("params", (0,), None, 8), ([[p]], [0], None, 8), ([[p]], (0,), None, "8")):
        with pytest.raises(TypeError):
            _C.triton_tables(*bad)


@pytest.mark.parametrize("var,value", [("DLOPT_TRITON_BLOCK", "1000"),
                                       ("DLOPT_TRITON_ITERS", "0"),
                                       ("DLOPT_TRITON_WARPS", "many")])
def test_launch_size_variables_are_checked(var, value, monkeypatch, fresh_launch_sizes):
    """The A/B launch sizes take powers of two in range; anything else is a ValueError
    naming the variable, not a failed compile."""
    monkeypatch.setenv(var, value)
    fresh_launch_sizes.reset_launch_sizes()
    with pytest.raises(ValueError, match=var):
        fresh_launch_sizes.launch_sizes()


@pytest.fixture
def fresh_launch_sizes():
    """triton._common with its launch sizes read again after the test (which changes
    the variables they are read from)."""
    from dlopt_kernels.triton import _common
    yield _common
    _common.reset_launch_sizes()


def test_launch_sizes_are_read_once_until_reset(monkeypatch, fresh_launch_sizes):
    """A step reads the launch sizes on every call: they come from the environment once
    (tools/triton_sizes.py calls reset_launch_sizes between the settings it times)."""
    c = fresh_launch_sizes
    c.reset_launch_sizes()
    before = c.launch_sizes()
    monkeypatch.setenv("DLOPT_TRITON_ITERS", "4")
    assert c.launch_sizes() == before
    c.reset_launch_sizes()
    assert c.launch_sizes() == (before[0], 4, before[2])


@needs_cpp
def test_native_groups_by_key_lists_match_the_python_twin(monkeypatch):
    """multi_tensor_groups(key_lists=...) (the norm's and LAMB's launches) gives the same
    groups, tensor indices and tables through _C.triton_tables as in Python, for mixed
    dtypes (float64 included), odd offsets, a transposed tensor and zero-size ones."""
    from dlopt_kernels.triton import _common
    store = torch.randn(300)
    xs = [torch.randn(64), torch.randn(0), torch.randn(9, 8).t(), store[1:65],
          torch.randn(40).double(), torch.randn(16).bfloat16(), torch.randn(33).half(),
          torch.randn(64)]
    out = []
    for py in ("0", "1"):
        monkeypatch.setenv("DLOPT_TRITON_PY_TABLES", py)
        _common._TABLE_CACHE.clear()
        groups = _common.multi_tensor_groups([xs, xs], None, 16, torch.device("cpu"),
                                             split_aligned=True, key_lists=(0, 1))
        out.append([(key, idx, table.tolist(), bmap.tolist(), n)
                    for key, idx, table, bmap, n in groups])
    assert out[0] == out[1]
    assert {key for key, *_ in out[0]} == {
        ((torch.float32, torch.float32), True), ((torch.float32, torch.float32), False),
        ((torch.float64, torch.float64), True), ((torch.bfloat16, torch.bfloat16), True),
        ((torch.float16, torch.float16), False)}


def test_host_time_tool_runs():
    """tools/triton_host_time.py (a Triton step's host time, launch stubbed) runs on the
    CPU in both table modes and reports both cases."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for py in ("0", "1"):
        out = subprocess.run([sys.executable, os.path.join(root, "tools", "triton_host_time.py"),
                              "--reps", "1"], capture_output=True, text=True, check=True,
                             env=dict(os.environ, DLOPT_TRITON_PY_TABLES=py)).stdout
        assert "gpt2_small (148 tensors)" in out and "tiny_1000 (1000 tensors)" in out
        assert ("Python" in out) == (py == "1")
