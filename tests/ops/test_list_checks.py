"""The element-wise list checks the Python kernels run first
(dlopt_kernels/backends/checks.py check_elementwise_lists): the C++ verdict
(`_C.elementwise_lists_ok`, csrc/python_lists.cpp) agrees with the Python twin on every
kind of list the checks refuse and on good ones, and a refused call raises the same
error either way."""
from __future__ import annotations

import pytest
import torch

from dlopt_kernels import _lib
from dlopt_kernels.backends import checks

pytestmark = pytest.mark.skipif(not _lib.LOADED["cpu"], reason="the C++ library did not load")


def _good(n=3, dtype=torch.bfloat16, states=2, masters=True):
    shapes = [(5,), (2, 3), ()][:n]
    ps = [torch.randn(s).to(dtype) for s in shapes]
    return dict(params=ps, grads=[torch.randn_like(p) for p in ps],
                states=[[torch.zeros_like(p, dtype=torch.float32) for p in ps]
                        for _ in range(states)],
                masters=[p.float() for p in ps] if masters else [],
                steps=[torch.zeros(()) for _ in ps], use_sr=False)


def _bad(kind):
    """A call of the given kind that the checks refuse (or None: a good one)."""
    c = _good()
    if kind == "good_no_masters":
        c = _good(masters=False, dtype=torch.float16)
    elif kind == "good_fp32_same_dtype_states":
        c = _good(dtype=torch.float32)
    elif kind == "shape":
        c["grads"][1] = torch.zeros(3, 2, dtype=torch.bfloat16)
    elif kind == "state_shape":
        c["states"][1][0] = torch.zeros(6)
    elif kind == "device":
        c["states"][0][2] = torch.zeros((), device="meta")
    elif kind == "param_dtype":
        c["params"][0] = c["params"][0].double()
        c["grads"][0] = c["grads"][0].double()
    elif kind == "grad_dtype":
        c["grads"][2] = c["grads"][2].float()
    elif kind == "mixed_states":
        c["states"][1][1] = c["states"][1][1].bfloat16()
    elif kind == "master_dtype":
        c["masters"][0] = c["masters"][0].double()
    elif kind == "master_with_low_states":
        for lst in c["states"]:
            lst[0] = lst[0].bfloat16()
    elif kind == "sr_fp16":
        c = _good(masters=False, dtype=torch.float16)
        c["use_sr"] = True
    elif kind == "step_size":
        c["steps"][1] = torch.zeros(2)
    elif kind == "step_dtype":
        c["steps"][0] = torch.zeros((), dtype=torch.int64)
    return c


KINDS = ["good", "good_no_masters", "good_fp32_same_dtype_states", "shape", "state_shape",
         "device", "param_dtype", "grad_dtype", "mixed_states", "master_dtype",
         "master_with_low_states", "sr_fp16", "step_size", "step_dtype"]


@pytest.mark.parametrize("kind", KINDS)
def test_native_verdict_matches_python(kind, monkeypatch):
    c = _bad(kind)
    from dlopt_kernels import _C
    native = _C.elementwise_lists_ok(c["params"], c["grads"], c["states"], c["masters"],
                                     c["steps"], c["use_sr"])
    python = checks._elementwise_lists_ok(c["params"], c["grads"], c["states"], c["masters"],
                                          c["steps"], c["use_sr"])
    assert native is python is kind.startswith("good")
    # and the public check raises the same error whichever verdict it used
    states = {f"s{k}": v for k, v in enumerate(c["states"])}

    def run():
        try:
            checks.check_elementwise_lists(c["params"], c["grads"], states, c["masters"],
                                           c["steps"], c["use_sr"])
        except (ValueError, TypeError) as exc:
            return type(exc), str(exc)
        return None

    got = run()
    monkeypatch.setattr(checks, "_native_lists_ok", lambda: None)
    assert run() == got
    assert (got is None) == kind.startswith("good")


def test_native_verdict_declines_what_it_cannot_read():
    """None (the Python path decides) for a tensor subclass or lists of another length."""
    from dlopt_kernels import _C

    class Sub(torch.Tensor):
        pass

    c = _good()
    args = [c["params"], c["grads"], c["states"], c["masters"], c["steps"], False]
    assert _C.elementwise_lists_ok(*args) is True
    sub = list(args)
    sub[1] = [c["grads"][0].as_subclass(Sub)] + c["grads"][1:]
    assert _C.elementwise_lists_ok(*sub) is None
    short = list(args)
    short[2] = [c["states"][0][:2], c["states"][1]]
    assert _C.elementwise_lists_ok(*short) is None
    assert _C.elementwise_lists_ok([], [], [], [], [], False) is True
    masters = list(args)
    masters[3] = c["masters"][:1]  # masters of another length than the params
    assert _C.elementwise_lists_ok(*masters) is None
    not_a_list = list(args)
    not_a_list[2] = [c["states"][0], "exp_avgs"]  # a state "list" that is not one
    assert _C.elementwise_lists_ok(*not_a_list) is None
    for k in range(5):  # each list argument of the wrong type
        wrong = list(args)
        wrong[k] = tuple(wrong[k])
        with pytest.raises(TypeError):
            _C.elementwise_lists_ok(*wrong)


def test_native_on_device():
    """_C.on_device (the step counts' device check of Triton's count_steps): True when
    every tensor sits on the reference's device, False when one does not (a meta
    tensor stands in for a second device), None for anything but plain tensors."""
    from dlopt_kernels import _C

    class Sub(torch.Tensor):
        pass

    steps = [torch.zeros(()) for _ in range(5)]
    assert _C.on_device(steps, steps[0]) is True
    assert _C.on_device([], steps[0]) is True
    assert _C.on_device(steps + [torch.zeros((), device="meta")], steps[0]) is False
    assert _C.on_device(steps, torch.zeros((), device="meta")) is False
    assert _C.on_device(steps + [steps[0].as_subclass(Sub)], steps[0]) is None
    assert _C.on_device(steps, steps[0].as_subclass(Sub)) is None
    assert _C.on_device(steps, "cpu") is None  # a reference that is not a tensor
    assert _C.on_device(steps + ["step"], steps[0]) is None  # an item that is not one
    with pytest.raises(TypeError):
        _C.on_device(tuple(steps), steps[0])
