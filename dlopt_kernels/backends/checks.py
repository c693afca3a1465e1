"""Host-side argument checks shared by the Python kernels (Triton launchers and the
pure-torch reference), the twins of csrc/include/dlopt/tensor_lists.h. Metadata only:
no syncs, nothing mutated, so a refused call changes nothing."""
from __future__ import annotations

import torch

from dlopt_kernels import _lib


def check_elementwise_lists(params, grads, states, master_params, state_steps, use_sr,
                            op="dlopt", has_steps=True, wide=False):
    """Python twin of tensor_lists.h check_elementwise_lists (host metadata only, no
    syncs): `states` maps a name to a list of per-param tensors shaped like the param.
    has_steps=False: the op keeps no step counts (SGD); `state_steps` may be empty.
    wide=True (the reference kernels): float64 params are taken too, with float64
    states and no master weights."""
    n = len(params)
    named = [("grads", grads, False), *((k, v, False) for k, v in states.items()),
             ("master_params", master_params, True),
             ("state_steps", state_steps, not has_steps)]
    for name, lst, may_be_empty in named:
        if len(lst) != n and not (may_be_empty and not lst):
            raise ValueError(f"dlopt: {name} has {len(lst)} tensors but params has {n}")
    native = _native_lists_ok()
    ok = None if native is None else native(list(params), list(grads),
                                            [list(v) for v in states.values()],
                                            list(master_params), list(state_steps),
                                            bool(use_sr))
    if ok is None or (not ok and wide):  # the C++ verdict knows no float64
        ok = _elementwise_lists_ok(params, grads, list(states.values()), master_params,
                                   state_steps, use_sr, wide)
    if ok:
        return
    # Something is off: find the first tensor at fault, for the error message.
    for i, p in enumerate(params):
        if p.dtype not in (_WIDE_DTYPES if wide else _PARAM_DTYPES):
            raise TypeError(f"{op}: unsupported param dtype {p.dtype} (params[{i}])")
        if grads[i].dtype != p.dtype:
            raise TypeError(f"dlopt: grads[{i}] dtype {grads[i].dtype} != params dtype {p.dtype}")
        others = [grads[i], *(lst[i] for lst in states.values())]
        others += [master_params[i]] if master_params else []
        for t in others:
            if t.shape != p.shape or t.device != p.device:
                raise ValueError(f"dlopt: tensors of params[{i}] must share its shape "
                                 f"{tuple(p.shape)} and device {p.device}, got "
                                 f"{tuple(t.shape)} on {t.device}")
        sts = {lst[i].dtype for lst in states.values()}
        if len(sts) > 1 or not sts <= {torch.float32, p.dtype}:
            raise TypeError(f"dlopt: state tensors of params[{i}] must share one dtype, "
                            f"float32 or the param dtype")
        if master_params and (master_params[i].dtype != torch.float32
                              or not sts <= {torch.float32}):
            raise TypeError("dlopt: master weights must be float32, with float32 states")
        if master_params and p.dtype == torch.float64:
            raise TypeError(f"dlopt: params[{i}] is float64: master weights are for bfloat16, "
                            f"float16 and float32 params")
        if use_sr and p.dtype == torch.float16:
            raise TypeError("dlopt: stochastic rounding supports bfloat16 and float32 params, "
                            "not float16")
        if state_steps and (state_steps[i].numel() != 1
                            or not state_steps[i].is_floating_point()):
            raise TypeError(f"dlopt: state_steps[{i}] must be a one-element float tensor")


_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_WIDE_DTYPES = _PARAM_DTYPES + (torch.float64,)


def _native_lists_ok():
    """`_C.elementwise_lists_ok` (csrc/python_lists.cpp), the same verdict as
    `_elementwise_lists_ok` at C speed, or None when the C++ library did not load."""
    return _lib.c_function("elementwise_lists_ok")


def _elementwise_lists_ok(params, grads, states, master_params, state_steps, use_sr,
                          wide=False):
    """check_elementwise_lists' verdict in a few passes over whole lists (a step's
    host time is spent here per tensor: 1,000 tensors took milliseconds one by one);
    the dtype rules are checked once per distinct combination of dtypes."""
    lists = [grads, *states, *([master_params] if master_params else [])]
    shapes = [p.shape for p in params]
    if not all([t.shape for t in lst] == shapes for lst in lists):
        return False
    dev = params[0].device if params else None
    if any(t.device != dev for lst in (params, *lists) for t in lst):
        return False
    combos = set(zip(*([t.dtype for t in lst] for lst in (params, *lists))))
    for dts in combos:
        p_dt, g_dt, st = dts[0], dts[1], set(dts[2:2 + len(states)])
        if p_dt not in (_WIDE_DTYPES if wide else _PARAM_DTYPES) or g_dt != p_dt or len(
                st) > 1 or not st <= {torch.float32, p_dt}:
            return False
        if master_params and (dts[-1] != torch.float32 or not st <= {torch.float32}
                              or p_dt == torch.float64):
            return False
        if use_sr and p_dt == torch.float16:
            return False
    return not state_steps or all(s.numel() == 1 and s.is_floating_point()
                                  for s in state_steps)


def check_sgd_lists(params, grads, momentum_buffers, master_params, momentum, new_buffers,
                    use_sr):
    """sgd_step's checks (Triton and reference): the momentum buffers only with momentum,
    no step counts, `new_buffers` empty or one flag per param."""
    use_momentum = momentum != 0.0
    check_elementwise_lists(params, grads,
                            {"momentum_buffers": momentum_buffers} if use_momentum else {},
                            master_params, [], use_sr, op="dlopt::sgd_step", has_steps=False,
                            wide=True)
    if new_buffers and len(new_buffers) != len(params):
        raise ValueError(f"dlopt: new_buffers has {len(new_buffers)} entries but params has "
                         f"{len(params)}")


def check_rmsprop_lists(params, grads, square_avgs, grad_avgs, momentum_buffers, master_params,
                        state_steps, momentum, centered, use_sr):
    """rmsprop_step's checks (Triton and reference): grad_avgs only when centered, the
    momentum buffers only with momentum > 0 (torch: `if momentum > 0`)."""
    states = {"square_avgs": square_avgs}
    states.update({"grad_avgs": grad_avgs} if centered else {})
    states.update({"momentum_buffers": momentum_buffers} if momentum > 0.0 else {})
    check_elementwise_lists(params, grads, states, master_params, state_steps, use_sr,
                            op="dlopt::rmsprop_step", wide=True)


def check_factored_lists(params, grads, row_vars, col_vars, variances, master_params,
                         state_steps, use_sr, op="dlopt::adafactor_step", wide=False):
    """Python twin of the checks of csrc/cpu/optim_adafactor.cpp: row_vars / col_vars
    hold one tensor per >= 2-D param (the param's shape with dim -1 / -2 set to 1) and
    variances one per 0-/1-D param (the param's shape), each in param order; states of
    one dtype per param, float32 or the param dtype."""
    check_elementwise_lists(params, grads, {}, master_params, state_steps, use_sr, op=op,
                            wide=wide)
    kf = kv = 0
    for i, p in enumerate(params):
        if p.dim() >= 2:
            if kf >= len(row_vars) or kf >= len(col_vars):
                raise ValueError(f"dlopt: row_vars / col_vars need one tensor per param of 2 "
                                 f"or more dims, got {len(row_vars)} / {len(col_vars)}")
            states = []
            for name, f, dim in (("row_vars", row_vars[kf], -1), ("col_vars", col_vars[kf], -2)):
                want = list(p.shape)
                want[dim] = 1
                if list(f.shape) != want or f.device != p.device:
                    raise ValueError(f"dlopt: {name}[{kf}] has shape {tuple(f.shape)} on "
                                     f"{f.device} but its param of shape {tuple(p.shape)} needs "
                                     f"{tuple(want)} on {p.device}")
                states.append(f)
            kf += 1
        else:
            if kv >= len(variances):
                raise ValueError(f"dlopt: variances needs one tensor per param of 0 or 1 dims, "
                                 f"got {len(variances)}")
            v = variances[kv]
            if v.shape != p.shape or v.device != p.device:
                raise ValueError(f"dlopt: variances[{kv}] has shape {tuple(v.shape)} on "
                                 f"{v.device} but its param has {tuple(p.shape)} on {p.device}")
            states = [v]
            kv += 1
        sts = {s.dtype for s in states}
        if len(sts) > 1 or not sts <= {torch.float32, p.dtype}:
            raise TypeError(f"dlopt: the states of params[{i}] must share one dtype, float32 "
                            f"or the param dtype")
        if master_params and sts != {torch.float32}:
            raise TypeError("dlopt: master weights need float32 states")
    if kf != len(row_vars) or kf != len(col_vars):
        raise ValueError(f"dlopt: row_vars / col_vars have {len(row_vars)} / {len(col_vars)} "
                         f"tensors but {kf} params have 2 or more dims")
    if kv != len(variances):
        raise ValueError(f"dlopt: variances has {len(variances)} tensors but {kv} params have "
                         f"0 or 1 dims")
