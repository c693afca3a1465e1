"""Machinery every dlopt optimizer shares: argument checks, backend choice, low-precision
params (fp32 master weights or bf16 stochastic rounding), state creation, GradScaler
support and state_dict loading that keeps our state dtypes.

A subclass sets `_state_keys` (the per-param state tensors besides 'step'), and
implements `_group_step(group, lists, grad_scale, found_inf)`, which calls one fused op
per (device, dtype) bucket.
"""
from __future__ import annotations

import functools
import math
from itertools import chain
from typing import Any, Callable, Iterable, Optional

import torch
import torch.optim.optimizer as _TORCH_OPTIMIZER
from torch import Tensor

from dlopt_kernels import _lib
from dlopt_kernels.backends import registry
from dlopt_kernels.ops._dtensor import register_if_loaded
from dlopt_kernels.ops._library import run_kernel

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# float64 params run in float64 (the reference kernels, or a compiled one that computes in
# double: ops/_library.py define_step); complex ones (where the class allows them) as
# their real views, as torch.optim steps them.
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def check_hparam(name: str, value: Any, *, low: float = 0.0, high: Optional[float] = None,
                 high_inclusive: bool = False, allow_tensor: bool = False) -> None:
    """Raise TypeError/ValueError naming `name` unless low <= value (< or <=) high."""
    if isinstance(value, Tensor):
        if not allow_tensor:
            raise TypeError(f"{name} must be a float, got a Tensor")
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        if value.is_complex() or not (value.is_floating_point() or value.dtype == torch.int64):
            raise TypeError(f"Tensor {name} must be a real floating point tensor, got {value.dtype}")
        v = float(value.detach().cpu())
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    else:
        v = float(value)
    ok = low <= v and (high is None or (v <= high if high_inclusive else v < high))
    if not ok or math.isnan(v):
        bound = "" if high is None else f" and {'<=' if high_inclusive else '<'} {high}"
        raise ValueError(f"Invalid {name}: {v} (must be >= {low}{bound})")


def check_bool(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool{' or None' if allow_none else ''}, got {value!r}")


_COLLECT = _lib.c_function("collect_group")  # the C twin of FusedOptimizer._collect

# torch's step hooks of every optimizer (torch.optim.optimizer, private names): our step
# wrapper runs them as torch's does; without them, torch's own wrapper is used.
_HOOKS_FOUND = all(hasattr(_TORCH_OPTIMIZER, n) for n in
                   ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"))


def _hook_step(func: Callable) -> Callable:
    """`func` (an optimizer's step) wrapped as torch.optim.Optimizer.profile_hook_step
    wraps it: step pre-hooks (which may replace the arguments), the step, the
    profiler's `_optimizer_step_code` marker, post-hooks, all within an
    `Optimizer.step#<class>.step` profiler range. The one difference: the range is
    opened only while a profiler runs (or under torch.compile, as torch does), because
    record_function costs a noticeable share of a fused step's host time
    (tools/step_host_time.py: the `profiler range` row against the `step` row)."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        if torch.compiler.is_compiling() or torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(
                    f"Optimizer.step#{type(self).__name__}.step"):
                return _with_hooks(func, self, args, kwargs)
        return _with_hooks(func, self, args, kwargs)

    wrapper.hooked = True  # what torch's _patch_step_function looks for
    return wrapper


def _with_hooks(func: Callable, self: Any, args: tuple, kwargs: dict) -> Any:
    for pre_hook in chain(_TORCH_OPTIMIZER._global_optimizer_pre_hooks.values(),
                          self._optimizer_step_pre_hooks.values()):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{func} must return None or a tuple of (new_args, "
                                   f"new_kwargs), but got {result}.")
    out = func(*args, **kwargs)
    self._optimizer_step_code()
    for post_hook in chain(self._optimizer_step_post_hooks.values(),
                           _TORCH_OPTIMIZER._global_optimizer_post_hooks.values()):
        post_hook(self, args, kwargs)
    return out


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: a torch.optim.Optimizer whose step is one fused multi-tensor op."""

    # Within one eager step(): id(group) -> its bucket from the C fast path, and whether
    # the bucket being stepped came from there (then _run calls the kernel directly).
    _prepared: dict[int, list[list]] = {}
    _direct = False

    _state_keys: tuple[str, ...] = ()
    _op_name: str = ""  # the dlopt op a step calls (its backends' dtypes: registry)
    # Whether the per-param state has a 'step' counter (torch's SGD keeps none).
    _has_step: bool = True
    # GradScaler hands us grad_scale / found_inf instead of unscaling grads itself.
    _step_supports_amp_scaling = True
    # Whether complex params are stepped (as their real views, as the torch.optim twin
    # does); classes whose maths torch does not define for complex params refuse them.
    _complex_params: bool = False

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, backend: str,
                 master_weights: bool, stochastic_rounding: bool, differentiable: bool,
                 foreach: Optional[bool], fused: Optional[bool]) -> None:
        registry.check_backend_name(backend)
        check_bool("master_weights", master_weights)
        check_bool("stochastic_rounding", stochastic_rounding)
        check_bool("foreach", foreach, allow_none=True)
        check_bool("fused", fused, allow_none=True)
        if differentiable:
            raise ValueError(
                "differentiable=True is not supported: dlopt_kernels optimizers update params "
                "in place with fused kernels that autograd cannot differentiate through "
                "(use torch.optim for differentiable optimizer steps)")
        if foreach and fused:
            raise ValueError("fused=True and foreach=True cannot be set together")
        if master_weights and stochastic_rounding:
            raise ValueError("master_weights=True and stochastic_rounding=True exclude each "
                             "other: pick fp32 master copies or bf16 stochastic rounding")
        defaults.update(backend=backend, master_weights=master_weights,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        register_if_loaded()  # DTensor params (FSDP2): their ops' rules

    def _patch_step_function(self) -> None:
        """torch.optim.Optimizer wraps the class's step in its hooks on first construction;
        ours does the same with _hook_step (hooks alike, the profiler range only while
        profiling)."""
        if not _HOOKS_FOUND:
            return super()._patch_step_function()
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"
        if not getattr(type(self).step, "hooked", None):
            type(self).step = _hook_step(type(self).step)

    # -- param groups -------------------------------------------------------------------
    def _check_group_hparams(self, group: dict[str, Any]) -> None:
        """Subclasses validate their hyperparameters (called for every param group)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        registry.check_backend_name(group["backend"], "backend")
        if group["master_weights"] and group["stochastic_rounding"]:
            raise ValueError("master_weights=True and stochastic_rounding=True exclude each other")
        self._check_group_hparams(group)
        device_types = set()
        wide = None  # the first float64 or complex128 param (float64 arithmetic)
        name = type(self).__name__
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                if not self._complex_params:
                    raise TypeError(f"params[{i}] is complex ({p.dtype}); {name} supports "
                                    "real params only (float32, bfloat16, float16, float64)")
                if p.dtype not in _COMPLEX_DTYPES:
                    raise TypeError(f"params[{i}] has dtype {p.dtype}; {name} supports "
                                    "complex64 and complex128 complex params")
            elif p.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(f"params[{i}] has dtype {p.dtype}; {name} supports float32, "
                                "bfloat16, float16 and float64 params"
                                + (" and complex64 and complex128 ones" if self._complex_params
                                   else ""))
            if wide is None and p.dtype in (torch.float64, torch.complex128):
                wide = (i, p.dtype)
            if p.is_sparse:
                raise TypeError(f"params[{i}] is a sparse tensor, which is not supported")
            if group["stochastic_rounding"] and p.dtype == torch.float16:
                raise ValueError(f"stochastic_rounding=True rounds to bfloat16, but params[{i}] is "
                                 "float16: use master_weights=True for float16 params")
            device_types.add(p.device.type)
        requested = registry.requested_backend(group["backend"])
        if requested != "auto":
            for dt in device_types:
                reason = registry.why_unavailable(requested, dt)
                if reason is not None:
                    raise registry.BackendUnavailableError(f"backend={requested!r}: {reason}")
            why = None if wide is None else registry.why_not_dtype(self._op_name, requested,
                                                                    torch.float64)
            if why is not None:
                raise registry.BackendUnavailableError(
                    f"backend={requested!r}: params[{wide[0]}] is {wide[1]}, but {why} "
                    f"(complex ones as their real views). backend='auto' or 'reference' runs "
                    f"them, in float64")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Checkpoints from torch.optim lack our keys: take this optimizer's defaults.
        for group in self.param_groups:
            for key in ("backend", "master_weights", "stochastic_rounding"):
                group.setdefault(key, self.defaults.get(key, False if key != "backend" else "auto"))

    # -- state ------------------------------------------------------------------------
    @staticmethod
    def _state_dtype(p: Tensor, group: dict[str, Any]) -> torch.dtype:
        """fp32 states for low-precision params with master weights or stochastic rounding
        (that is the point of both); otherwise the param dtype, as torch.optim does."""
        if p.dtype in _LOW_PRECISION and (
                group["master_weights"] or (group["stochastic_rounding"] and p.dtype == torch.bfloat16)):
            return torch.float32
        return p.dtype

    def _state_keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state tensors this group's params carry (besides 'step')."""
        return self._state_keys

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        dtype = self._state_dtype(p, group)
        # On the param's device (torch's fused/capturable layout), so kernels read it there.
        if self._has_step:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in self._state_keys_for(group):
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["master_weights"] and p.dtype in _LOW_PRECISION:
            state["master_param"] = p.detach().to(torch.float32, copy=True)

    def _master_of(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Optional[Tensor]:
        if not group["master_weights"] or p.dtype not in _LOW_PRECISION:
            return None
        master = state.get("master_param")
        if master is None:  # e.g. loaded from a torch.optim checkpoint
            master = state["master_param"] = p.detach().to(torch.float32, copy=True)
        return master

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint from this class or from the torch.optim twin.

        torch casts every floating state tensor to its param's dtype; we then restore
        the saved values at the dtype we keep (fp32 states and master copies for
        low-precision params), so training resumes bit for bit.
        """
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        super().load_state_dict(state_dict)
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for pid, (p, group) in zip(saved_ids, params):
            if pid not in saved_state or p not in self.state:
                continue
            state = self.state[p]
            for key, value in saved_state[pid].items():
                if not isinstance(value, Tensor):
                    continue
                if key == "step":
                    state[key] = value.detach().to(dtype=torch.float32, device=p.device).clone()
                elif key == "master_param":
                    state[key] = value.detach().to(dtype=torch.float32, device=p.device).clone()
                elif key in self._state_keys and value.is_floating_point():
                    dtype = self._state_dtype(p, group)
                    if value.shape == p.shape:
                        t = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    elif type(value) not in (Tensor, torch.nn.Parameter):
                        # a DTensor not shaped like its param (Adafactor's row_var / col_var
                        # under FSDP2, from torch.distributed.checkpoint): keep its layout
                        t = torch.empty_like(value, dtype=dtype)
                    else:  # a state not shaped like its param (Adafactor's row_var / col_var)
                        t = torch.empty(value.shape, dtype=dtype, device=p.device)
                    state[key] = t.copy_(value.detach())

    # -- step -------------------------------------------------------------------------
    @staticmethod
    def _sr_seed(group: dict[str, Any], device: torch.device, dtype: Optional[torch.dtype]) -> Optional[Tensor]:
        if not group["stochastic_rounding"] or dtype != torch.bfloat16:
            return None  # stochastic rounding rounds to bfloat16 only
        return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)

    @staticmethod
    def _on_device(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
        """A GradScaler tensor (grad_scale, found_inf) on the bucket's device, no sync."""
        return None if t is None else t.to(device, non_blocking=True)

    def _lr_tensor(self, lr: Any, device: torch.device,
                   param_dtype: Optional[torch.dtype] = None) -> Tensor:
        """lr as the 1-element tensor the kernels take (float64 on the CPU, where the
        kernel reads it on the host; float32 on a GPU, but float64 for float64 and
        complex128 params, whose step is float64 throughout). A float lr's tensor is
        kept between eager steps while the value stays the same: building it is a torch
        op call per step (and a host-to-device copy on a GPU). The kernels never write it."""
        wide = device.type == "cpu" or param_dtype in (torch.float64, torch.complex128)
        dtype = torch.float64 if wide else torch.float32
        if isinstance(lr, Tensor):
            return lr.to(device=device, dtype=dtype)
        if torch.compiler.is_compiling():
            return torch.tensor(lr, dtype=dtype, device=device)
        cache = self.__dict__.setdefault("_lr_cache", {})  # (device, dtype) -> (value, tensor)
        hit = cache.get((device, dtype))
        if hit is None or hit[0] != lr or type(hit[0]) is not type(lr):
            hit = cache[(device, dtype)] = (lr, torch.tensor(lr, dtype=dtype, device=device))
        return hit[1]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform one optimization step. `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Eager steps may take the C fast path (list building in C, kernels called
        # without the Python op layer); under torch.compile everything goes through
        # the public ops, which trace.
        if torch.compiler.is_compiling() or _COLLECT is None:
            self._check_step_inputs()  # before any group is stepped: a refused step changes nothing
            for group in self.param_groups:
                self._group_step(group, grad_scale, found_inf)
            return loss
        self._prepared = self._check_step_inputs(fast=True)
        try:
            for group in self.param_groups:
                self._group_step(group, grad_scale, found_inf)
        finally:
            self._prepared = {}
            self._direct = False
        return loss

    def _group_step(self, group: dict[str, Any], grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor]) -> None:
        raise NotImplementedError

    def _check_step_inputs(self, fast: bool = False) -> dict[int, list[list]]:
        """Refuse what no group can step (sparse grads, grads of another dtype). With
        `fast`, try the C fast path per group first and return its buckets by id(group)."""
        name = type(self).__name__
        prepared: dict[int, list[list]] = {}
        for group in self.param_groups:
            registry.check_backend_name(group["backend"], "backend")
            if fast:
                lists = self._fast_lists(group)
                if lists is not None:  # the C walk found nothing to refuse
                    prepared[id(group)] = lists
                    continue
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise TypeError(f"{name} does not support sparse gradients (got one for a "
                                    f"param of shape {tuple(p.shape)}); use torch.optim.SparseAdam")
                if g.dtype != p.dtype:
                    raise TypeError(f"a grad has dtype {g.dtype} but its param has {p.dtype}")
        return prepared

    def _fast_lists(self, group: dict[str, Any]) -> Optional[list[list]]:
        """The group's one bucket built by the C fast path (dlopt_kernels._C.collect_group),
        or None when the Python path must do it (first step, mixed devices or dtypes,
        tensor subclasses, anything to refuse)."""
        params = group["params"]
        if type(params) is not list or not isinstance(self.state, dict):
            return None
        keys = self._state_keys_for(group)
        step_keys = ("step",) if self._has_step else ()
        out = _COLLECT(params, self.state, step_keys + keys,
                       "master_param" if group["master_weights"] else None)
        if out is None:
            return None
        steps = out[2] if self._has_step else []
        return [out[0], out[1], steps, out[-1], *out[2 + len(step_keys):-1]]

    def _run(self, op: Any, *args: Any) -> Any:
        """Call the fused `op` with `args` (params first, backend last). On a bucket of
        the C fast path, call the kernel the op would pick directly, skipping the op
        layer's Python (argument conversion, routing; compare the `op only` and
        `dlopt[cpu]` rows of benchmarks/bench_optim_adam.py's tiny_1000 case). A
        compiled kernel goes through `_C.call_compiled`, which also skips the Python
        op call's per-tensor argument conversion."""
        params = args[0]
        if (not torch.compiler.is_compiling() and self._direct and params
                and params[0].device.type in ("cpu", "cuda")):
            return run_kernel(op.__name__, args)
        return op(*args)

    def _collect(self, group: dict[str, Any], name: str) -> dict[tuple, list[list]]:
        """Bucket the params of `group` that have a grad by (device, dtype), creating
        state on first use. Each bucket is [params, grads, steps, masters, *states] with
        states in `_state_keys` order; `masters` is empty unless the bucket is
        low-precision under master_weights; `steps` is empty without `_has_step`."""
        if not torch.compiler.is_compiling():
            lists = self._prepared.pop(id(group), None)
            self._direct = lists is not None
            if lists is not None:
                return {(lists[0][0].device, lists[0][0].dtype): lists}
        buckets: dict[tuple, list[list]] = {}
        state_of = self.state
        keys = self._state_keys_for(group)
        use_master = group["master_weights"]
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            state = state_of.get(p)
            if not state:
                # an optimizer that keeps nothing for p (SGD without momentum) leaves no
                # entry in self.state, as torch does
                state = {}
                self._init_state(p, state, group)
                if state:
                    state_of[p] = state
            key = (p.device, p.dtype)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = [[] for _ in range(4 + len(keys))]
            bucket[0].append(p)
            bucket[1].append(g)
            if self._has_step:
                bucket[2].append(state["step"])
            if use_master and p.dtype in _LOW_PRECISION:
                bucket[3].append(self._master_of(p, state, group))
            for i, k in enumerate(keys):
                bucket[4 + i].append(state[k])
        return buckets
