"""`torch.ops.dlopt.adam_step`: the multi-tensor Adam/AdamW step.

One call updates every param of a list in one pass over memory. The op mutates
`params`, `exp_avgs`, `exp_avg_sqs`, `max_exp_avg_sqs` (amsgrad; empty otherwise),
`master_params` (fp32 master weights; empty for none) and `state_steps` (each
incremented by one, unless `found_inf` is non-zero: then nothing at all changes).

`lr` is a 0-dim tensor so schedulers and torch.compile do not recompile. `sr_seed`
(an int64 0-dim tensor, or None) turns on stochastic rounding of bf16 params.
`backend` is "auto" | "cpu" | "cuda" | "triton" | "reference".
"""
from __future__ import annotations

import torch

from dlopt_kernels.backends.registry import resolve
from dlopt_kernels.ops._library import compiled, define

SCHEMA = (
    "adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, "
    "Tensor(f!)[] state_steps, Tensor lr, float beta1, float beta2, float weight_decay, "
    "float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
    "Tensor? grad_scale, Tensor? found_inf, Tensor? sr_seed, str backend='auto') -> ()")


def _impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps,
          lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
          grad_scale, found_inf, sr_seed, backend="auto") -> None:
    if not params:
        return
    _, kernel = resolve("adam_step", params[0].device, backend)
    kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps,
           lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
           grad_scale, found_inf, sr_seed)


def _fake(*args) -> None:
    return None


adam_step = define(SCHEMA, _impl, _fake, backends={
    "cpu": compiled("adam_step"),
    "cuda": compiled("adam_step"),
    "triton": "dlopt_kernels.triton.optim_adam:adam_step",
    "reference": "dlopt_kernels.backends.reference.optim_adam:adam_step",
})
