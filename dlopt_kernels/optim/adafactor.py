"""Adafactor as a drop-in replacement for torch.optim.Adafactor."""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from dlopt_kernels.ops.optim_adafactor import adafactor_step
from dlopt_kernels.optim._base import FusedOptimizer, check_bool, check_hparam


class Adafactor(FusedOptimizer):
    r"""Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with
    Sublinear Memory Cost", https://arxiv.org/abs/1804.04235), fused.

    Same constructor arguments, defaults, maths and ``state_dict`` layout as
    ``torch.optim.Adafactor`` (torch's variant of the paper: ``lr`` caps the relative
    step size and scales the decoupled weight decay; eps1 stabilizes the variance
    estimate): a torch checkpoint loads into this class and this class's into torch.
    Per param at step t, with w = t^beta2_decay and rho = min(lr, 1/sqrt(t)):

    - alpha = max(eps2, RMS(p)) * rho; p = p * (1 - lr * weight_decay);
    - params of 2 or more dims keep a factored second moment over their last two dims
      (leading dims are a batch): ``row_var`` (shape with dim -1 = 1) and ``col_var``
      (dim -2 = 1) move towards the row / column means of g^2 (lerp by w), and the
      estimate is v = row_var col_var / max(mean(row_var), eps1);
      0-D and 1-D params keep the full ``variance`` (lerp towards g^2 by w), v = variance;
    - u = g / sqrt(max(v, eps1^2)); p = p - alpha / max(1, RMS(u) / d) * u.

    State per param: ``step`` and either ``row_var`` + ``col_var`` or ``variance``, as in
    torch (plus ``master_param`` under ``master_weights``). The whole step is one fused
    multi-tensor op per (device, dtype): it computes the row / column means, the RMS of
    each param and of each update in the same call.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
            float32, bfloat16, float16 (fp32 arithmetic) and float64 (in double: the
            C++ CPU kernel, or the reference kernels on other devices) params; complex
            params are refused, as torch does.
        lr (float or Tensor): the maximum relative step size and the weight decay's
            scale (default: 1e-2). A 1-element tensor avoids recompiles under
            torch.compile when a scheduler changes it.
        beta2_decay (float): the decay rate of beta2, <= 0 (default: -0.8).
        eps (tuple of (float or None, float)): eps1, the floor of the variance estimate
            (None: the machine epsilon of the group's first param with a grad, as torch),
            and eps2, the floor of the param RMS in alpha (default: (None, 1e-3)).
        d (float): the clipping threshold of the update's RMS, >= 1 (default: 1.0).
        weight_decay (float): decoupled weight decay, scaled by lr (default: 0.0).
        foreach (bool, optional): accepted for compatibility; the step is always the
            fused kernel (same maths).
        maximize (bool): maximize the objective instead of minimizing (default: False).
        backend (str): "auto" | "cpu" | "cuda" | "triton" | "reference"; see
            ``dlopt_kernels.backends``. The environment variable ``DLOPT_BACKEND``
            replaces "auto".
        master_weights (bool): for bf16/fp16 params keep an fp32 copy (state key
            ``master_param``, saved in the state_dict) and fp32 second-moment states;
            the param is the rounded copy.
        stochastic_rounding (bool): for bf16 params keep fp32 second-moment states but no
            fp32 copy: the updated value is rounded to bf16 stochastically (unbiased).
            Not for fp16 params.

    Differences from torch: a zero-size param has its step counted and nothing else
    (torch divides by zero there); GradScaler's grad scale and inf check are applied
    inside the step (torch's Adafactor lets the scaler unscale the grads first), with
    the same result.
    """

    _state_keys = ("row_var", "col_var", "variance")
    _op_name = "adafactor_step"  # torch.ops.dlopt.adafactor_step

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-2,
                 beta2_decay: float = -0.8, eps: tuple[Optional[float], float] = (None, 1e-3),
                 d: float = 1.0, weight_decay: float = 0.0, *, foreach: Optional[bool] = None,
                 maximize: bool = False, backend: str = "auto", master_weights: bool = False,
                 stochastic_rounding: bool = False) -> None:
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                        weight_decay=weight_decay, foreach=foreach, maximize=maximize)
        self._check_group_hparams(defaults)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, differentiable=False,
                         foreach=foreach, fused=None)

    def _check_group_hparams(self, group: dict[str, Any]) -> None:
        check_hparam("lr", group["lr"], allow_tensor=True)
        _check_float("beta2_decay", group["beta2_decay"], "beta2_decay should be <= 0",
                     lambda v: v <= 0.0)
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise TypeError(f"eps must be a tuple (eps1 or None, eps2), got {eps!r}")
        if eps[0] is not None:
            _check_float("eps[0]", eps[0], "epsilon1 should be >= 0", lambda v: v >= 0.0)
        _check_float("eps[1]", eps[1], "epsilon2 should be >= 0", lambda v: v >= 0.0)
        _check_float("d", group["d"], "Clipping threshold d should be >= 1",
                     lambda v: v >= 1.0)
        check_hparam("weight_decay", group["weight_decay"])
        check_bool("maximize", group["maximize"])
        check_bool("foreach", group["foreach"], allow_none=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)

    # -- state --------------------------------------------------------------------------
    def _state_keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ()  # made by _init_state: which ones, and their shapes, depend on the param

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        super()._init_state(p, state, group)  # step (and master_param)
        dtype = self._state_dtype(p, group)
        if p.dim() > 1:
            state["row_var"] = p.new_zeros((*p.shape[:-1], 1), dtype=dtype)
            state["col_var"] = p.new_zeros((*p.shape[:-2], 1, p.shape[-1]), dtype=dtype)
        else:
            state["variance"] = torch.zeros_like(p, dtype=dtype,
                                                 memory_format=torch.preserve_format)

    # -- step ---------------------------------------------------------------------------
    def _group_step(self, group: dict[str, Any], grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor]) -> None:
        eps1, eps2 = group["eps"]
        if eps1 is None:
            # torch: the machine epsilon of the first param with a grad, for the group
            first = next((p for p in group["params"] if p.grad is not None), None)
            if first is None:
                return
            eps1 = torch.finfo(first.dtype).eps
        for (device, dtype), (params, grads, steps, masters) in self._collect(
                group, "Adafactor").items():
            row_vars, col_vars, variances = [], [], []
            for p in params:
                st = self.state[p]
                if p.dim() > 1:
                    row_vars.append(st["row_var"])
                    col_vars.append(st["col_var"])
                else:
                    variances.append(st["variance"])
            self._run(adafactor_step, params, grads, row_vars, col_vars, variances, masters, steps,
                           self._lr_tensor(group["lr"], device, dtype), float(group["beta2_decay"]),
                           float(eps1), float(eps2), float(group["d"]),
                           float(group["weight_decay"]), group["maximize"],
                           self._on_device(grad_scale, device), self._on_device(found_inf, device),
                           self._sr_seed(group, device, dtype), group["backend"])


def _check_float(name: str, value: Any, rule: str, ok) -> None:
    """TypeError unless a real number; ValueError (naming `name`, with torch's phrase
    `rule`) unless ok(value)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if math.isnan(value) or not ok(float(value)):
        raise ValueError(f"Invalid {name}: {rule} but is: {value}")
