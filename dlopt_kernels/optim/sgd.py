"""SGD as a drop-in replacement for torch.optim.SGD."""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from dlopt_kernels.ops.optim_sgd import sgd_step
from dlopt_kernels.optim._base import FusedOptimizer, check_bool, check_hparam


class SGD(FusedOptimizer):
    r"""Stochastic gradient descent (optionally with momentum, dampening and Nesterov
    momentum, Sutskever et al. 2013), fused.

    Same constructor arguments, defaults, maths and ``state_dict`` layout as
    ``torch.optim.SGD``: a torch checkpoint loads into this class and this class's into
    torch. The state of a param is only ``momentum_buffer`` (none at all without
    momentum; no ``step``), created on the param's first step as a copy of its
    (decayed) gradient, as in torch. The whole step is one fused multi-tensor kernel
    per (device, dtype).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
            float32, bfloat16, float16 (fp32 arithmetic), float64 (in double) and
            complex64 / complex128 params (their real views, as torch); see
            docs/compat.md, "float64 and complex params".
        lr (float or Tensor): learning rate (default: 1e-3). A 1-element tensor avoids
            recompiles under torch.compile when a scheduler changes it.
        momentum (float): momentum factor (default: 0).
        dampening (float): dampening for momentum (default: 0).
        weight_decay (float or Tensor): L2 penalty added to the gradient (default: 0).
        nesterov (bool): Nesterov momentum; needs momentum > 0 and dampening 0
            (default: False).
        maximize (bool): maximize the objective instead of minimizing (default: False).
        foreach, fused (bool, optional): accepted for compatibility; the step is always
            the fused kernel (same maths). Both True together is an error, as in torch.
        differentiable (bool): must be False (a fused in-place step has no autograd).
        backend (str): "auto" | "cpu" | "cuda" | "triton" | "reference"; see
            ``dlopt_kernels.backends``. The environment variable ``DLOPT_BACKEND``
            replaces "auto".
        master_weights (bool): for bf16/fp16 params keep an fp32 copy (state key
            ``master_param``, saved in the state_dict) and an fp32 momentum buffer; the
            param is the rounded copy.
        stochastic_rounding (bool): for bf16 params keep an fp32 momentum buffer but no
            fp32 copy: the updated value is rounded to bf16 stochastically (unbiased),
            so small updates are not lost. Not for fp16 params.

    With ``torch.amp.GradScaler``, an overflow step changes nothing. On a param's very
    first momentum step that decision needs the value of ``found_inf`` on the host
    (one sync, only on that step), because a skipped first step must leave no buffer.
    """

    _state_keys = ("momentum_buffer",)
    _op_name = "sgd_step"  # torch.ops.dlopt.sgd_step
    _complex_params = True  # stepped as real views, as torch.optim does
    _has_step = False

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: Union[float, Tensor] = 0,
                 nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False,
                 fused: Optional[bool] = None, backend: str = "auto",
                 master_weights: bool = False, stochastic_rounding: bool = False) -> None:
        check_bool("nesterov", nesterov)
        check_bool("maximize", maximize)
        check_bool("differentiable", differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, differentiable=differentiable, fused=fused)
        self._check_group_hparams(defaults)
        # As torch, only the constructor's values are held to this (a param group may set
        # nesterov=True with momentum 0: then it has no momentum, as in torch).
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening == 0 "
                             f"(got momentum={momentum}, dampening={dampening})")
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, differentiable=differentiable,
                         foreach=foreach, fused=fused)

    def _check_group_hparams(self, group: dict[str, Any]) -> None:
        check_hparam("lr", group["lr"], allow_tensor=True)
        check_hparam("momentum", group["momentum"])
        check_hparam("dampening", group["dampening"], low=-math.inf)
        check_hparam("weight_decay", group["weight_decay"], allow_tensor=True)
        check_bool("nesterov", group["nesterov"])
        check_bool("maximize", group["maximize"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def _state_keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        # torch keeps a momentum buffer only when momentum != 0
        return self._state_keys if group["momentum"] != 0 else ()

    def _new_buffers(self, group: dict[str, Any], found_inf: Optional[Tensor]) -> Optional[set]:
        """Create the momentum buffers this step starts (torch: a clone of the grad on a
        param's first step; here the kernel writes it) and return their params' ids;
        None if the step is skipped (GradScaler overflow) before any buffer exists."""
        need = [p for p in group["params"] if p.grad is not None
                and "momentum_buffer" not in self.state.get(p, ())]
        if not need:
            return set()
        if found_inf is not None and float(found_inf) != 0.0:
            return None  # a skipped first step leaves no buffer, as torch's skipped step()
        for p in need:
            st = self.state[p]
            if not st:
                self._init_state(p, st, group)
            else:  # e.g. master_param only (a group switched to momentum)
                st["momentum_buffer"] = torch.zeros_like(
                    p, dtype=self._state_dtype(p, group), memory_format=torch.preserve_format)
        return {id(p) for p in need}

    def _group_step(self, group: dict[str, Any], grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor]) -> None:
        momentum = float(group["momentum"])
        new = set()
        if momentum != 0.0:
            new = self._new_buffers(group, found_inf)
            if new is None:
                return
        weight_decay = float(group["weight_decay"])
        for (device, dtype), lists in self._collect(group, "SGD").items():
            params, grads, _, masters = lists[:4]
            bufs = lists[4] if momentum != 0.0 else []
            new_flags = [id(p) in new for p in params] if new else []
            self._run(sgd_step, params, grads, bufs, masters, self._lr_tensor(group["lr"], device, dtype),
                     weight_decay, momentum, float(group["dampening"]), group["nesterov"],
                     group["maximize"], new_flags, self._on_device(grad_scale, device),
                     self._on_device(found_inf, device), self._sr_seed(group, device, dtype),
                     group["backend"])
