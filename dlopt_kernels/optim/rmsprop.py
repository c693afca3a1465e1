"""RMSprop as a drop-in replacement for torch.optim.RMSprop."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from dlopt_kernels.ops.optim_rmsprop import rmsprop_step
from dlopt_kernels.optim._base import FusedOptimizer, check_bool, check_hparam


class RMSprop(FusedOptimizer):
    r"""RMSprop (Hinton, Srivastava & Swersky, "Neural Networks for Machine Learning",
    lecture 6e; the centered variant of Graves 2013, "Generating Sequences With Recurrent
    Neural Networks"), fused.

    Same constructor arguments (in the same positional order), defaults, maths and
    ``state_dict`` layout as ``torch.optim.RMSprop``: a torch checkpoint loads into this
    class and this class's into torch. A param's state is ``step``, ``square_avg``, plus
    ``momentum_buffer`` when momentum > 0 and ``grad_avg`` when centered, created on its
    first step. The whole step is one fused multi-tensor kernel per (device, dtype).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
            float32, bfloat16, float16 (fp32 arithmetic), float64 (in double) and
            complex64 / complex128 params (their real views, as torch); see
            docs/compat.md, "float64 and complex params".
        lr (float or Tensor): learning rate (default: 1e-2). A 1-element tensor avoids
            recompiles under torch.compile when a scheduler changes it.
        alpha (float): smoothing constant of the squared-gradient average (default: 0.99).
        eps (float): added to the denominator for numerical stability (default: 1e-8).
        weight_decay (float): L2 penalty added to the gradient (default: 0).
        momentum (float): momentum factor on the normalized gradient (default: 0).
        centered (bool): normalize by an estimate of the gradient's variance (the
            squared average minus the squared mean gradient) (default: False).
        capturable (bool): accepted; our kernels read lr and step from device memory,
            so the step is CUDA-graph capturable whatever this says.
        foreach (bool, optional): accepted for compatibility; the step is always the
            fused kernel (same maths).
        maximize (bool): maximize the objective instead of minimizing (default: False).
        differentiable (bool): must be False (a fused in-place step has no autograd).
        backend (str): "auto" | "cpu" | "cuda" | "triton" | "reference"; see
            ``dlopt_kernels.backends``. The environment variable ``DLOPT_BACKEND``
            replaces "auto".
        master_weights (bool): for bf16/fp16 params keep an fp32 copy (state key
            ``master_param``, saved in the state_dict) and fp32 states; the param is the
            rounded copy.
        stochastic_rounding (bool): for bf16 params keep fp32 states but no fp32 copy:
            the updated value is rounded to bf16 stochastically (unbiased), so small
            updates are not lost. Not for fp16 params.

    Unlike torch's RMSprop, ours takes ``torch.amp.GradScaler``'s grad_scale /
    found_inf itself (an overflow step changes nothing, ``step`` included).
    """

    _state_keys = ("square_avg", "momentum_buffer", "grad_avg")
    _op_name = "rmsprop_step"  # torch.ops.dlopt.rmsprop_step
    _complex_params = True  # stepped as real views, as torch.optim does

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-2, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0, momentum: float = 0,
                 centered: bool = False, capturable: bool = False,
                 foreach: Optional[bool] = None, maximize: bool = False,
                 differentiable: bool = False, *, backend: str = "auto",
                 master_weights: bool = False, stochastic_rounding: bool = False) -> None:
        check_bool("centered", centered)
        check_bool("capturable", capturable)
        check_bool("maximize", maximize)
        check_bool("differentiable", differentiable)
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                        maximize=maximize, differentiable=differentiable)
        self._check_group_hparams(defaults)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, differentiable=differentiable,
                         foreach=foreach, fused=None)

    def _check_group_hparams(self, group: dict[str, Any]) -> None:
        check_hparam("lr", group["lr"], allow_tensor=True)
        check_hparam("eps", group["eps"])
        check_hparam("momentum", group["momentum"])
        check_hparam("weight_decay", group["weight_decay"])
        check_hparam("alpha", group["alpha"])
        check_bool("centered", group["centered"])
        check_bool("maximize", group["maximize"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("momentum", 0)
            group.setdefault("centered", False)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)

    def _state_keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        # torch keeps momentum_buffer only when momentum > 0, grad_avg only when centered
        keys = ("square_avg",)
        if group["momentum"] > 0:
            keys += ("momentum_buffer",)
        if group["centered"]:
            keys += ("grad_avg",)
        return keys

    def _group_step(self, group: dict[str, Any], grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor]) -> None:
        keys = self._state_keys_for(group)
        for p in group["params"]:  # a group switched to momentum / centered after a checkpoint
            st = self.state.get(p)
            if st and p.grad is not None:
                for key in keys:
                    if key not in st:
                        st[key] = torch.zeros_like(st["square_avg"],
                                                   memory_format=torch.preserve_format)
        momentum, centered = float(group["momentum"]), group["centered"]
        for (device, dtype), lists in self._collect(group, "RMSprop").items():
            params, grads, steps, masters = lists[:4]
            named = dict(zip(keys, lists[4:]))
            self._run(rmsprop_step, params, grads, named["square_avg"], named.get("grad_avg", []),
                         named.get("momentum_buffer", []), masters, steps,
                         self._lr_tensor(group["lr"], device, dtype), float(group["alpha"]),
                         float(group["eps"]), float(group["weight_decay"]), momentum, centered,
                         group["maximize"], self._on_device(grad_scale, device),
                         self._on_device(found_inf, device), self._sr_seed(group, device, dtype),
                         group["backend"])
