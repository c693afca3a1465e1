"""The eager fast path of FusedOptimizer.step (dlopt_kernels._C.collect_group builds the
lists in C; the kernel is called without the Python op layer): it must give exactly
what the Python path gives, hand every case it does not handle to the Python path, and
never change anything the user passed when it declines."""
import pytest
import torch
from torch import nn

from dlopt_kernels import optim
from dlopt_kernels.optim import _base

pytestmark = pytest.mark.skipif(_base._COLLECT is None, reason="needs the compiled C++ library")

# (class, kwargs) covering every optimizer and the state layouts that differ
CASES = [
    (optim.Adam, {}), (optim.AdamW, {"amsgrad": True}), (optim.SGD, {"lr": 0.1}),
    (optim.SGD, {"lr": 0.1, "momentum": 0.9}), (optim.Adagrad, {}),
    (optim.RMSprop, {"momentum": 0.5, "centered": True}), (optim.Adafactor, {}),
    (optim.Lion, {}), (optim.LAMB, {}),
]


def _params(dtype=torch.float32, shapes=((3, 5), (7,), (), (2, 3, 4))):
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


def _set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _run(cls, kw, params, steps, fast, monkeypatch):
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(_base, "_COLLECT", None)
        opt = cls(params, **kw)
        for k in range(steps):
            _set_grads(params, 100 + k)
            opt.step()
    return opt


@pytest.mark.parametrize("cls,kw", CASES, ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("dtype,lowp", [(torch.float32, {}), (torch.bfloat16, {"master_weights": True}),
                                        (torch.bfloat16, {"stochastic_rounding": True})],
                         ids=["fp32", "bf16-master", "bf16-sr"])
def test_fast_path_matches_python_path(cls, kw, dtype, lowp, monkeypatch):
    kw = {**kw, **lowp}
    a = _params(dtype)
    b = [p.detach().clone().requires_grad_() for p in a]
    calls = []
    real = _base._COLLECT
    monkeypatch.setattr(_base, "_COLLECT", lambda *args: calls.append(1) or real(*args))
    torch.manual_seed(0)  # the stochastic-rounding seed draws from the global generator
    oa = _run(cls, kw, a, 3, True, monkeypatch)
    monkeypatch.setattr(_base, "_COLLECT", real)
    torch.manual_seed(0)
    ob = _run(cls, kw, b, 3, False, monkeypatch)
    assert calls, "the fast path was never tried"
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for key in sa[k]:
            torch.testing.assert_close(sa[k][key], sb[k][key], rtol=0, atol=0)


def test_fast_path_is_taken_after_the_first_step():
    params = _params()
    opt = optim.AdamW(params)
    _set_grads(params, 0)
    opt.step()  # creates the state: Python path
    group = opt.param_groups[0]
    lists = opt._fast_lists(group)
    assert lists is not None
    got_params, grads, steps, masters, exp_avgs, exp_avg_sqs = lists
    assert [id(p) for p in got_params] == [id(p) for p in params]
    assert all(g is p.grad for g, p in zip(grads, params))
    assert all(s is opt.state[p]["step"] for s, p in zip(steps, params))
    assert all(m is opt.state[p]["exp_avg"] for m, p in zip(exp_avgs, params))
    assert all(v is opt.state[p]["exp_avg_sq"] for v, p in zip(exp_avg_sqs, params))
    assert masters == []


def test_params_without_grad_are_left_out():
    params = _params()
    opt = optim.Adam(params)
    _set_grads(params, 0)
    opt.step()
    params[1].grad = None
    lists = opt._fast_lists(opt.param_groups[0])
    assert [id(p) for p in lists[0]] == [id(p) for i, p in enumerate(params) if i != 1]


def _declines(opt):
    before = {p: dict(s) for p, s in opt.state.items()}
    assert opt._fast_lists(opt.param_groups[0]) is None
    # nothing was added to the state (it is a defaultdict) or replaced in it
    assert set(opt.state.keys()) == set(before.keys())
    for p, s in opt.state.items():
        assert s == before[p]


def test_declines_first_step_mixed_dtypes_subclasses_and_missing_state():
    params = _params()
    opt = optim.Adam(params)
    _set_grads(params, 0)
    _declines(opt)  # no state yet
    opt.step()
    params[0].grad_dtype = None  # torch refuses a grad of another dtype unless told
    params[0].grad = params[0].grad.to(torch.float64)
    _declines(opt)
    _set_grads(params, 1)
    del opt.state[params[2]]["exp_avg_sq"]  # a missing state key
    _declines(opt)


def test_declines_mixed_param_dtypes_then_steps_both_buckets():
    params = _params() + _params(torch.bfloat16)
    opt = optim.AdamW(params, master_weights=True)
    for k in range(2):
        _set_grads(params, k)
        opt.step()
    _declines(opt)
    for p in params:
        assert opt.state[p]["step"].item() == 2


def test_declines_tensor_subclass():
    class Sub(torch.Tensor):
        pass

    params = [torch.randn(4, requires_grad=True).as_subclass(Sub).detach().requires_grad_()]
    opt = optim.SGD(params, lr=0.1, momentum=0.9)
    params[0].grad = torch.ones(4)
    opt.step()
    assert type(params[0]) is Sub
    _declines(opt)


def test_sparse_grad_is_refused_before_any_group_steps():
    a, b = _params(shapes=((4,),)), _params(shapes=((5,),))
    opt = optim.Adam([{"params": a}, {"params": b}])
    _set_grads(a + b, 0)
    opt.step()
    snapshot = [p.detach().clone() for p in a + b]
    b[0].grad = torch.ones(5).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    for p, s in zip(a + b, snapshot):
        torch.testing.assert_close(p.detach(), s, rtol=0, atol=0)
    assert opt.state[a[0]]["step"].item() == 1


def test_grad_dtype_mismatch_is_a_type_error_on_the_fast_path():
    params = _params()
    opt = optim.Adam(params)
    _set_grads(params, 0)
    opt.step()
    params[0].grad_dtype = None
    params[0].grad = params[0].grad.half()
    with pytest.raises(TypeError, match="dtype"):
        opt.step()


def test_fast_path_bumps_version_counters():
    # autograd's in-place checks rely on version counters, whichever path ran
    params = _params()
    opt = optim.Adam(params)
    _set_grads(params, 0)
    opt.step()
    before = [p._version for p in params]
    opt.step()
    assert all(p._version > v for p, v in zip(params, before))


def test_compiled_step_does_not_use_the_fast_path(monkeypatch):
    params = _params(shapes=((8,), (3, 3)))
    opt = optim.AdamW(params)
    _set_grads(params, 0)
    opt.step()
    calls = []
    real = _base._COLLECT
    monkeypatch.setattr(_base, "_COLLECT", lambda *a: calls.append(1) or real(*a))

    @torch.compile(fullgraph=True, backend="eager")
    def step():
        opt.step()

    step()
    assert calls == []


def test_collect_group_refuses_wrong_argument_types():
    with pytest.raises(TypeError, match="list"):
        _base._COLLECT((torch.zeros(2),), {}, (), None)  # params must be a list
    with pytest.raises(TypeError, match="dict"):
        _base._COLLECT([torch.zeros(2)], [], (), None)  # state must be a dict
    with pytest.raises(TypeError, match="tuple"):
        _base._COLLECT([torch.zeros(2)], {}, ["exp_avg"], None)  # keys must be a tuple


# ------------------------------------------------------------ _C.call_compiled


def _lion_args(seed):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(7, generator=g), torch.randn(2, 3, generator=g)]
    return ([ps, [torch.randn(p.shape, generator=g) for p in ps],
             [torch.randn(p.shape, generator=g).abs() for p in ps], [],
             [torch.zeros(()) for _ in ps], torch.tensor(1e-2, dtype=torch.float64),
             0.9, 0.99, 0.1, False, None, None, None])


def test_call_compiled_matches_the_op_for_ops_of_one_signature():
    """Adagrad's and Lion's compiled ops share a C++ signature: each name must still
    reach its own op, whichever ran first."""
    from dlopt_kernels import _C
    for name in ("adagrad_step", "lion_step", "adagrad_step"):
        a, b = _lion_args(7), _lion_args(7)
        if name == "adagrad_step":  # (params, grads, sums, masters, steps, lr, decay, wd, eps, max)
            a[6:9] = b[6:9] = [1e-3, 0.1, 1e-10]
        getattr(torch.ops.dlopt_C, name)(*a)
        _C.call_compiled(name, *b)
        for x, y in zip(a[0] + a[2] + a[4], b[0] + b[2] + b[4]):
            assert torch.equal(x, y), name


def test_call_compiled_keeps_no_reference():
    """Tensors are borrowed, not referenced: nothing outlives the call."""
    import gc
    import weakref
    from dlopt_kernels import _C
    args = _lion_args(3)
    refs = [weakref.ref(t) for lst in args[:5] for t in lst] + [weakref.ref(args[5])]
    _C.call_compiled("lion_step", *args)
    del args
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda a: ("lion_step", *a[:-1]), TypeError, "takes 13 arguments"),
    (lambda a: ("lion_step", tuple(a[0]), *a[1:]), TypeError, "list of tensors"),
    (lambda a: ("lion_step", a[0] + [1.0], *a[1:]), TypeError, "tensor"),
    (lambda a: ("lion_step", *a[:9], 0, *a[10:]), TypeError, "bool"),
    (lambda a: ("lion_step", *a[:5], 0.01, *a[6:]), TypeError, "tensor"),
    (lambda a: ("lion_step", *a[:6], "0.9", *a[7:]), TypeError, "float"),
    (lambda a: ("no_such_step", *a), ValueError, "unknown op"),
    (lambda a: (3, *a), TypeError, "name must be a str"),
], ids=["count", "tuple", "float_in_list", "int_for_bool", "float_for_tensor", "str_for_float",
        "unknown", "name"])
def test_call_compiled_refuses_bad_arguments(bad, exc, match):
    from dlopt_kernels import _C
    args = _lion_args(5)
    before = [t.clone() for lst in args[:5] for t in lst]
    with pytest.raises(exc, match=match):
        _C.call_compiled(*bad(args))
    assert all(torch.equal(x, y) for x, y in zip(before, [t for lst in args[:5] for t in lst]))


@pytest.mark.parametrize("breaker, named", [
    (lambda a: a[1].__setitem__(0, a[1][0].double()), "grads"),  # a grad of another dtype
    (lambda a: a[2].__setitem__(1, torch.zeros(4)), "exp_avgs"),  # a state of another shape
    (lambda a: a.__setitem__(1, a[1][:1]), "grads"),  # a list one tensor short
    (lambda a: a[0].__setitem__(0, a[0][0].to(torch.int32)), "param"),  # integer param
], ids=["grad_dtype", "state_shape", "grads_length", "int_param"])
def test_call_compiled_passes_kernel_refusals_on(breaker, named):
    """A refusal raised inside the kernel comes back as the kernel's RuntimeError naming
    the argument, nothing is changed, and no reference is left behind (the borrowed
    tensors are given back on the way out)."""
    import gc
    import weakref
    from dlopt_kernels import _C
    args = _lion_args(9)
    breaker(args)
    before = [t.clone() for lst in args[:5] for t in lst]
    with pytest.raises(RuntimeError, match=named):
        _C.call_compiled("lion_step", *args)
    assert all(torch.equal(x, y) for x, y in zip(before, [t for lst in args[:5] for t in lst]))
    refs = [weakref.ref(t) for lst in args[:5] for t in lst]
    del args, before
    gc.collect()
    assert all(r() is None for r in refs)


def test_call_compiled_empty_lists_do_nothing():
    from dlopt_kernels import _C
    _C.call_compiled("lion_step", [], [], [], [], [], torch.tensor(1e-3, dtype=torch.float64),
                     0.9, 0.99, 0.0, False, None, None, None)


def test_collect_group_finds_state_by_address_hash_and_falls_back():
    """collect_group looks params up in the state dict by their address (Tensor.__hash__
    is id(self)); a dict whose keys hash otherwise must miss, never find a wrong entry:
    then the answer is None and the Python path takes over."""
    from dlopt_kernels import _C
    ps = [nn.Parameter(torch.randn(3)) for _ in range(5)]
    for p in ps:
        p.grad = torch.randn(3)
    state = {p: {"step": torch.zeros(()), "exp_avg": torch.full((3,), float(i))}
             for i, p in enumerate(ps)}
    out = _C.collect_group(ps, state, ("step", "exp_avg"), None)
    assert out is not None
    assert all(a is p for a, p in zip(out[0], ps))
    assert [float(t[0]) for t in out[3]] == [0.0, 1.0, 2.0, 3.0, 4.0]

    # A Tensor.__hash__ that is not the address: the check on the first param sends
    # the walk through the dict's own hashing, which still finds every param.
    def odd_hash(self):
        return id(self) ^ 1

    original = torch.Tensor.__hash__
    torch.Tensor.__hash__ = odd_hash  # Parameter inherits it
    try:
        odd = {p: v for p, v in state.items()}
        again = _C.collect_group(ps, odd, ("step", "exp_avg"), None)
    finally:
        torch.Tensor.__hash__ = original
    assert again is not None and [float(t[0]) for t in again[3]] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_step_host_time_tool_runs():
    """tools/step_host_time.py (the host time of an eager step, split in parts) runs on
    the CPU and reports both cases with every row."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(root, "tools", "step_host_time.py"),
                          "--reps", "3"], capture_output=True, text=True, check=True).stdout
    for case in ("gpt2_small", "tiny_1000"):
        line = next(ln for ln in out.splitlines() if ln.startswith(case))
        for row in ("step", "collect", "kernel call", "torch fused", "profiler range"):
            assert f"{row} " in line, line
    if not torch.cuda.is_available():  # asking for a GPU that is not there: a clear error
        bad = subprocess.run([sys.executable, os.path.join(root, "tools", "step_host_time.py"),
                              "--device", "cuda"], capture_output=True, text=True)
        assert bad.returncode == 2 and "no CUDA device" in bad.stderr
