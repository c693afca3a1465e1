"""Adam and AdamW as drop-in replacements for torch.optim.Adam / torch.optim.AdamW."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from dlopt_kernels.ops.optim_adam import adam_step
from dlopt_kernels.optim._base import FusedOptimizer, check_bool, check_hparam

_DOC_COMMON = r"""
    Same constructor arguments, defaults, maths and ``state_dict`` layout as
    ``torch.optim.{name}``: a torch checkpoint loads into this class and this class's
    into torch. The whole step is one fused multi-tensor kernel per (device, dtype).

    Args:
        params: iterable of parameters or dicts defining parameter groups. float32,
            bfloat16 and float16 params (fp32 arithmetic); float64 (arithmetic in
            double: the C++ CPU and Triton kernels, or the reference on other
            devices); complex64 / complex128, stepped as their real views as torch
            does (docs/compat.md, "float64 and complex params").
        lr (float or Tensor): learning rate (default: {lr}). A 1-element tensor avoids
            recompiles under torch.compile when a scheduler changes it.
        betas (tuple of two floats): coefficients of the running averages of the
            gradient and its square (default: (0.9, 0.999)).
        eps (float): added to the denominator for numerical stability (default: 1e-8).
        weight_decay (float): {wd_doc} (default: {wd}).
        amsgrad (bool): use the AMSGrad variant (default: False).
        foreach, fused (bool, optional): accepted for compatibility; the step is always
            the fused kernel (same maths). Both True together is an error, as in torch.
        maximize (bool): maximize the objective instead of minimizing (default: False).
        capturable (bool): accepted; our kernels read lr and step from device memory,
            so the step is CUDA-graph capturable whatever this says (with float
            betas: Tensor betas are read on the host, docs/compat.md).
        differentiable (bool): must be False (a fused in-place step has no autograd).
        backend (str): "auto" | "cpu" | "cuda" | "triton" | "reference"; see
            ``dlopt_kernels.backends``. The environment variable ``DLOPT_BACKEND``
            replaces "auto".
        master_weights (bool): for bf16/fp16 params keep an fp32 copy (state key
            ``master_param``, saved in the state_dict) and fp32 states; the param is
            the rounded copy. 16 + 4 bytes of state per param more than plain bf16.
        stochastic_rounding (bool): for bf16 params keep fp32 states but no fp32 copy:
            the updated value is rounded to bf16 stochastically (unbiased), so small
            updates are not lost. Not for fp16 params.
"""


class Adam(FusedOptimizer):
    __doc__ = "Adam (Kingma & Ba, 2014), fused.\n" + _DOC_COMMON.format(
        name="Adam", lr="1e-3", wd="0",
        wd_doc="L2 penalty added to the gradient (decoupled, as AdamW, when "
               "decoupled_weight_decay=True)")

    _state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _op_name = "adam_step"  # torch.ops.dlopt.adam_step
    _complex_params = True  # stepped as real views, as torch.optim does
    _name = "Adam"

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: bool = False,
                 backend: str = "auto", master_weights: bool = False,
                 stochastic_rounding: bool = False) -> None:
        check_bool("amsgrad", amsgrad)
        check_bool("maximize", maximize)
        check_bool("capturable", capturable)
        check_bool("differentiable", differentiable)
        check_bool("decoupled_weight_decay", decoupled_weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        self._check_group_hparams(defaults)
        _check_tensor_hparams(lr, betas, foreach, capturable)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, differentiable=differentiable,
                         foreach=foreach, fused=fused)

    def _check_group_hparams(self, group: dict[str, Any]) -> None:
        check_hparam("lr", group["lr"], allow_tensor=True)
        check_hparam("eps", group["eps"])
        check_hparam("weight_decay", group["weight_decay"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a tuple of two floats, got {betas!r}")
        for i, b in enumerate(betas):
            check_hparam(f"betas[{i}]", b, high=1.0, allow_tensor=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", self.defaults["decoupled_weight_decay"])

    def _state_keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        # torch keeps max_exp_avg_sq only under amsgrad
        return self._state_keys if group["amsgrad"] else self._state_keys[:2]

    def _group_step(self, group: dict[str, Any], grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor]) -> None:
        amsgrad = group["amsgrad"]
        if amsgrad:
            for p in group["params"]:  # a group switched to amsgrad after a checkpoint
                st = self.state.get(p)
                if st and "max_exp_avg_sq" not in st:
                    st["max_exp_avg_sq"] = torch.zeros_like(st["exp_avg_sq"],
                                                            memory_format=torch.preserve_format)
        beta1, beta2 = (float(b) for b in group["betas"])
        for (device, dtype), lists in self._collect(group, self._name).items():
            params, grads, steps, masters, exp_avgs, exp_avg_sqs = lists[:6]
            max_sqs = lists[6] if amsgrad else []
            self._run(adam_step, params, grads, exp_avgs, exp_avg_sqs, max_sqs, masters, steps,
                      self._lr_tensor(group["lr"], device, dtype), beta1, beta2,
                      float(group["weight_decay"]), float(group["eps"]), amsgrad,
                      group["maximize"], group["decoupled_weight_decay"],
                      _on(grad_scale, device), _on(found_inf, device),
                      self._sr_seed(group, device, dtype), group["backend"])


def _check_tensor_hparams(lr: Any, betas: Any, foreach: Optional[bool], capturable: bool) -> None:
    """torch.optim.Adam's rules for Tensor lr / betas, kept so that code which runs
    here also runs on torch (our kernels would take any of these)."""
    if isinstance(lr, Tensor) and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    if isinstance(betas[0], Tensor) and foreach and not capturable:
        raise ValueError("betas[0] as a Tensor is not supported for capturable=False and "
                         "foreach=True")


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if t is None else t.to(device, non_blocking=True)


class AdamW(Adam):
    __doc__ = "AdamW (Loshchilov & Hutter, 2019), fused.\n" + _DOC_COMMON.format(
        name="AdamW", lr="1e-3", wd="1e-2",
        wd_doc="decoupled weight decay: p *= 1 - lr * weight_decay before the Adam update")
    _name = "AdamW"

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, backend: str = "auto",
                 master_weights: bool = False, stochastic_rounding: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, backend=backend,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding)
