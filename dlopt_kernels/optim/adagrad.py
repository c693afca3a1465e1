"""Adagrad as a drop-in replacement for torch.optim.Adagrad."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from dlopt_kernels.ops.optim_adagrad import adagrad_step
from dlopt_kernels.optim._base import FusedOptimizer, check_bool, check_hparam


class Adagrad(FusedOptimizer):
    r"""Adagrad (Duchi, Hazan & Singer 2011, "Adaptive Subgradient Methods for Online
    Learning and Stochastic Optimization"), fused.

    Same constructor arguments, defaults, maths and ``state_dict`` layout as
    ``torch.optim.Adagrad``: a torch checkpoint loads into this class and this class's
    into torch. As in torch, every param gets its state (``step`` and ``sum``, the
    latter filled with ``initial_accumulator_value``) when the optimizer is built; a
    param added later with ``add_param_group`` gets it on its first step, filled with the
    constructor's ``initial_accumulator_value``. The whole step is one fused
    multi-tensor kernel per (device, dtype).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
            float32, bfloat16, float16 (fp32 arithmetic), float64 (in double) and
            complex64 / complex128 params (their real views, as torch); see
            docs/compat.md, "float64 and complex params".
        lr (float or Tensor): learning rate (default: 1e-2). A 1-element tensor avoids
            recompiles under torch.compile when a scheduler changes it.
        lr_decay (float): the learning rate at step t is lr / (1 + (t - 1) * lr_decay)
            (default: 0).
        weight_decay (float): L2 penalty added to the gradient (default: 0).
        initial_accumulator_value (float): starting value of the sum of squared
            gradients (default: 0).
        eps (float): added to the denominator for numerical stability (default: 1e-10).
        foreach, fused (bool, optional): accepted for compatibility; the step is always
            the fused kernel (same maths). Both True together is an error, as in torch.
        maximize (bool): maximize the objective instead of minimizing (default: False).
        differentiable (bool): must be False (a fused in-place step has no autograd).
        backend (str): "auto" | "cpu" | "cuda" | "triton" | "reference"; see
            ``dlopt_kernels.backends``. The environment variable ``DLOPT_BACKEND``
            replaces "auto".
        master_weights (bool): for bf16/fp16 params keep an fp32 copy (state key
            ``master_param``, made on the param's first step and saved in the
            state_dict) and an fp32 ``sum``; the param is the rounded copy.
        stochastic_rounding (bool): for bf16 params keep an fp32 ``sum`` but no fp32
            copy: the updated value is rounded to bf16 stochastically (unbiased), so
            small updates are not lost. Not for fp16 params.
    """

    _state_keys = ("sum",)
    _op_name = "adagrad_step"  # torch.ops.dlopt.adagrad_step
    _complex_params = True  # stepped as real views, as torch.optim does

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-2, lr_decay: float = 0,
                 weight_decay: float = 0, initial_accumulator_value: float = 0,
                 eps: float = 1e-10, foreach: Optional[bool] = None, *, maximize: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 backend: str = "auto", master_weights: bool = False,
                 stochastic_rounding: bool = False) -> None:
        check_bool("maximize", maximize)
        check_bool("differentiable", differentiable)
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach,
                        maximize=maximize, differentiable=differentiable, fused=fused)
        self._check_group_hparams(defaults)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, differentiable=differentiable,
                         foreach=foreach, fused=fused)
        # torch creates every param's state now (so it is in the state_dict from the start)
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, self.state[p], group)

    def _check_group_hparams(self, group: dict[str, Any]) -> None:
        check_hparam("lr", group["lr"], allow_tensor=True)
        check_hparam("lr_decay", group["lr_decay"])
        check_hparam("weight_decay", group["weight_decay"])
        check_hparam("initial_accumulator_value", group["initial_accumulator_value"])
        check_hparam("eps", group["eps"])
        check_bool("maximize", group["maximize"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        # torch fills `sum` with the constructor's initial_accumulator_value (not a later
        # group's). No master copy here: _collect makes it on the first step, so a
        # checkpoint loaded into the model after building the optimizer is honoured.
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        init = self.defaults["initial_accumulator_value"]
        if p.is_complex():  # torch: both the real and the imaginary part start at it
            init = complex(init, init)
        state["sum"] = torch.full_like(p, init,
                                       dtype=self._state_dtype(p, group),
                                       memory_format=torch.preserve_format)

    def share_memory(self) -> None:
        """Calls tensor.share_memory_() on the state sum tensors (as torch)."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def _group_step(self, group: dict[str, Any], grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor]) -> None:
        for (device, dtype), lists in self._collect(group, "Adagrad").items():
            params, grads, steps, masters, sums = lists
            self._run(adagrad_step, params, grads, sums, masters, steps,
                         self._lr_tensor(group["lr"], device, dtype), float(group["lr_decay"]),
                         float(group["weight_decay"]), float(group["eps"]), group["maximize"],
                         self._on_device(grad_scale, device), self._on_device(found_inf, device),
                         self._sr_seed(group, device, dtype), group["backend"])
