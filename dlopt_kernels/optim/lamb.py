"""LAMB (Layer-wise Adaptive Moments for Batch training), fused."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from dlopt_kernels.ops.multi_tensor_norm import multi_tensor_norm
from dlopt_kernels.ops.optim_lamb import lamb_step
from dlopt_kernels.optim._base import FusedOptimizer, check_bool, check_hparam


class LAMB(FusedOptimizer):
    r"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training
    BERT in 76 minutes", https://arxiv.org/abs/1904.00962, Algorithm 2), fused, with the
    global grad-norm clipping of NVIDIA apex's ``FusedLAMB``.

    Per parameter tensor :math:`x` with gradient :math:`g` at step :math:`t`:

    .. math::
        g &\leftarrow g \cdot \min\bigl(1, \tfrac{\text{max\_grad\_norm}}{\lVert G \rVert}\bigr)
            \quad (\lVert G \rVert \text{ the norm of all grads; only if max\_grad\_norm}) \\
        m &= \beta_1 m + (1 - \beta_1) g, \qquad v = \beta_2 v + (1 - \beta_2) g^2 \\
        u &= \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \lambda x, \qquad
            \hat m = \frac{m}{1 - \beta_1^t},\ \hat v = \frac{v}{1 - \beta_2^t}
            \ (\text{bias\_correction; else } m, v) \\
        x &= x - \eta \, \frac{\lVert x \rVert}{\lVert u \rVert} \, u
            \quad (\text{the trust ratio is 1 when either norm is 0})

    The trust ratio is applied to every tensor, as in the paper (apex applies it only
    when weight_decay != 0 unless ``use_nvlamb``). The step is one fused multi-tensor op
    per (device, dtype) that updates the moments and takes both norms of each tensor in
    one pass, then applies the update in a second; the global grad norm (only computed
    when ``max_grad_norm`` is set) is one ``multi_tensor_norm`` per device over the grads
    of every param group, as apex does. Arithmetic is fp32 whatever the storage dtype;
    norms and the trust ratio in double.

    State per param: ``step`` (a float32 0-dim tensor), ``exp_avg`` and ``exp_avg_sq``
    (:math:`m`, :math:`v`), plus ``master_param`` under ``master_weights``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
            float32, bfloat16, float16 (fp32 arithmetic) and float64 (in double: the
            C++ CPU kernel, or the reference kernels on other devices) params; complex
            params are refused.
        lr (float or Tensor): learning rate :math:`\eta` (default: 1e-3). A 1-element
            tensor avoids recompiles under torch.compile when a scheduler changes it.
        betas (tuple of two floats): :math:`\beta_1, \beta_2` in [0, 1) (default:
            (0.9, 0.999)).
        eps (float): added to :math:`\sqrt{\hat v}` (default: 1e-6).
        weight_decay (float): :math:`\lambda`, added to the update (default: 0.01).
        bias_correction (bool): divide the moments by :math:`1 - \beta^t` (default:
            True, as apex).
        max_grad_norm (float, optional): clip all grads together to this global L2
            norm before the moments (apex's semantics: scale by max_grad_norm / norm when
            the norm is larger; the norm is of the unscaled grads under GradScaler).
            None or 0 turns it off (default: None; apex's default is 1.0).
        backend (str): "auto" | "cpu" | "cuda" | "triton" | "reference"; see
            ``dlopt_kernels.backends``. The environment variable ``DLOPT_BACKEND``
            replaces "auto".
        master_weights (bool): for bf16/fp16 params keep an fp32 copy (state key
            ``master_param``, saved in the state_dict) and fp32 states; the param is
            the rounded copy; norms and updates use the fp32 copy.
        stochastic_rounding (bool): for bf16 params keep fp32 states but no fp32 copy:
            the updated value is rounded to bf16 stochastically (unbiased). Not for
            fp16 params.
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _op_name = "lamb_step"  # torch.ops.dlopt.lamb_step

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, *, bias_correction: bool = True,
                 max_grad_norm: Optional[float] = None, backend: str = "auto",
                 master_weights: bool = False, stochastic_rounding: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_grad_norm=max_grad_norm)
        self._check_group_hparams(defaults)
        self._grad_norms: Optional[dict] = None
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, differentiable=False,
                         foreach=None, fused=None)

    def _check_group_hparams(self, group: dict[str, Any]) -> None:
        check_hparam("lr", group["lr"], allow_tensor=True)
        check_hparam("eps", group["eps"])
        check_hparam("weight_decay", group["weight_decay"])
        check_bool("bias_correction", group["bias_correction"])
        if group["max_grad_norm"] is not None:
            check_hparam("max_grad_norm", group["max_grad_norm"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a tuple of two floats, got {betas!r}")
        for i, b in enumerate(betas):
            check_hparam(f"betas[{i}]", b, high=1.0, allow_tensor=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._grad_norms = None
        for group in self.param_groups:
            group.setdefault("bias_correction", True)
            group.setdefault("max_grad_norm", None)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. `closure` re-evaluates the model and returns the loss."""
        self._grad_norms = None  # the global grad norm is taken once per step, when needed
        return super().step(closure)

    def _global_grad_norm(self, device: torch.device) -> Tensor:
        """The L2 norm of the grads of every param group (as stored, i.e. still scaled
        under GradScaler; the op unscales it), on `device`: one multi_tensor_norm per
        device, computed on the first call of a step."""
        if self._grad_norms is None:
            by_device: dict[torch.device, tuple[list[Tensor], str]] = {}
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads, _ = by_device.setdefault(p.grad.device, ([], group["backend"]))
                        grads.append(p.grad)
            totals = [_total_norm(grads, backend) for grads, backend in by_device.values()]
            if len(totals) == 1:
                total = totals[0]
            else:
                first = next(iter(by_device))
                total = torch.linalg.vector_norm(
                    torch.stack([t.to(first, non_blocking=True) for t in totals]))
            self._grad_norms = {d: total.to(d, non_blocking=True) for d in by_device}
        return self._grad_norms[device]

    def _group_step(self, group: dict[str, Any], grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor]) -> None:
        beta1, beta2 = (float(b) for b in group["betas"])
        max_norm = float(group["max_grad_norm"] or 0.0)
        for (device, dtype), lists in self._collect(group, "LAMB").items():
            params, grads, steps, masters, exp_avgs, exp_avg_sqs = lists
            self._run(lamb_step, params, grads, exp_avgs, exp_avg_sqs, masters, steps,
                      self._lr_tensor(group["lr"], device, dtype), beta1, beta2,
                      float(group["weight_decay"]), float(group["eps"]),
                      group["bias_correction"], max_norm,
                      self._global_grad_norm(device) if max_norm > 0 else None,
                      self._on_device(grad_scale, device), self._on_device(found_inf, device),
                      self._sr_seed(group, device, dtype), group["backend"])


def _total_norm(grads: list[Tensor], backend: str) -> Tensor:
    """The L2 norm of `grads` (one device): one fused multi_tensor_norm (an fp32
    result), or in float64 when a grad is float64, whose step is float64 throughout."""
    if any(g.dtype == torch.float64 for g in grads):
        return torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]))
    return multi_tensor_norm(grads, 2.0, backend)[1]
