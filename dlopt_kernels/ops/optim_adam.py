"""`torch.ops.dlopt.adam_step`: the multi-tensor Adam/AdamW step.

One call updates every param of a list in one pass over memory. The op mutates
`params`, `exp_avgs`, `exp_avg_sqs`, `max_exp_avg_sqs` (amsgrad), `master_params`
(fp32 master weights, may be empty) and `state_steps` (incremented by one unless
`found_inf` is non-zero, in which case nothing at all changes).

`lr` is a 0-dim tensor so schedulers and torch.compile do not recompile. `sr_seed`
(an int64 0-dim tensor, or None) turns on stochastic rounding of bf16 params.
`backend` is "auto" | "cpu" | "cuda" | "triton" | "reference".
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dlopt_kernels.backends.registry import resolve

_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params",
            "state_steps")


@torch.library.custom_op("dlopt::adam_step", mutates_args=_MUTATED)
def adam_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
              exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor],
              master_params: list[Tensor], state_steps: list[Tensor], lr: Tensor,
              beta1: float, beta2: float, weight_decay: float, eps: float, amsgrad: bool,
              maximize: bool, decoupled_weight_decay: bool, grad_scale: Optional[Tensor],
              found_inf: Optional[Tensor], sr_seed: Optional[Tensor],
              backend: str = "auto") -> None:
    if not params:
        return
    _, kernel = resolve("adam_step", params[0].device, backend)
    kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps,
           lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
           grad_scale, found_inf, sr_seed)


@adam_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, lr,
      beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale,
      found_inf, sr_seed, backend="auto") -> None:
    return None
