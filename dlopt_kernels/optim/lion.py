"""Lion (EvoLved Sign Momentum), fused."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from torch import Tensor

from dlopt_kernels.ops.optim_lion import lion_step
from dlopt_kernels.optim._base import FusedOptimizer, check_bool, check_hparam


class Lion(FusedOptimizer):
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms",
    https://arxiv.org/abs/2302.06675, Algorithm 2), fused.

    Per element, with :math:`g` the gradient (negated under ``maximize``):

    .. math::
        c &= \beta_1 m + (1 - \beta_1) g \\
        \theta &= \theta (1 - \eta \lambda) - \eta\, \mathrm{sign}(c) \\
        m &= \beta_2 m + (1 - \beta_2) g

    The update has the same size, ``lr``, in every coordinate, so Lion wants a learning
    rate 3-10x smaller than AdamW's and a weight decay 3-10x larger (the paper, Sec. 5).
    The whole step is one fused multi-tensor kernel per (device, dtype); arithmetic is
    fp32 whatever the storage dtype.

    State per param: ``exp_avg`` (the momentum :math:`m`, shaped like the param) and
    ``step`` (a float32 count of the steps taken, which Lion's maths does not use; kept
    as every other optimizer keeps it, and not advanced by a step GradScaler skips),
    plus ``master_param`` under ``master_weights``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
            float32, bfloat16, float16 (fp32 arithmetic) and float64 (in double)
            params; complex params are refused (the paper's update is real).
        lr (float or Tensor): learning rate :math:`\eta` (default: 1e-4). A 1-element
            tensor avoids recompiles under torch.compile when a scheduler changes it.
        betas (tuple of two floats): :math:`\beta_1` (interpolation for the update) and
            :math:`\beta_2` (momentum decay), each in [0, 1] (default: (0.9, 0.99)).
        weight_decay (float): decoupled weight decay :math:`\lambda` (default: 0).
        maximize (bool): maximize the objective instead of minimizing (default: False).
        backend (str): "auto" | "cpu" | "cuda" | "triton" | "reference"; see
            ``dlopt_kernels.backends``. The environment variable ``DLOPT_BACKEND``
            replaces "auto".
        master_weights (bool): for bf16/fp16 params keep an fp32 copy (state key
            ``master_param``, saved in the state_dict) and an fp32 ``exp_avg``; the
            param is the rounded copy.
        stochastic_rounding (bool): for bf16 params keep an fp32 ``exp_avg`` but no fp32
            copy: the updated value is rounded to bf16 stochastically (unbiased), so
            updates smaller than half a bf16 ulp are not lost. Not for fp16 params.
    """

    _state_keys = ("exp_avg",)
    _op_name = "lion_step"  # torch.ops.dlopt.lion_step

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, *,
                 maximize: bool = False, backend: str = "auto", master_weights: bool = False,
                 stochastic_rounding: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        self._check_group_hparams(defaults)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, differentiable=False,
                         foreach=None, fused=None)

    def _check_group_hparams(self, group: dict[str, Any]) -> None:
        check_hparam("lr", group["lr"], allow_tensor=True)
        check_hparam("weight_decay", group["weight_decay"])
        check_bool("maximize", group["maximize"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a tuple of two floats, got {betas!r}")
        for i, b in enumerate(betas):
            check_hparam(f"betas[{i}]", b, high=1.0, high_inclusive=True, allow_tensor=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def _group_step(self, group: dict[str, Any], grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor]) -> None:
        beta1, beta2 = (float(b) for b in group["betas"])
        for (device, dtype), lists in self._collect(group, "Lion").items():
            params, grads, steps, masters, exp_avgs = lists
            self._run(lion_step, params, grads, exp_avgs, masters, steps,
                      self._lr_tensor(group["lr"], device, dtype), beta1, beta2,
                      float(group["weight_decay"]), group["maximize"],
                      self._on_device(grad_scale, device), self._on_device(found_inf, device),
                      self._sr_seed(group, device, dtype), group["backend"])
