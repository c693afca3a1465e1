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

from dlopt_kernels.ops._library import compiled, define_step

SCHEMA = (
    "adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, "
    "Tensor(f!)[] state_steps, Tensor lr, float beta1, float beta2, float weight_decay, "
    "float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
    "Tensor? grad_scale, Tensor? found_inf, Tensor? sr_seed, str backend='auto') -> ()")

# float64 params: the C++ CPU and the Triton kernels compute in double (CUDA in fp32)
adam_step = define_step(SCHEMA, complex_params=True, float64_backends=("cpu", "triton"), backends={
    "cpu": compiled("adam_step"),
    "cuda": compiled("adam_step"),
    "triton": "dlopt_kernels.triton.optim_adam:adam_step",
    "reference": "dlopt_kernels.backends.reference.optim_adam:adam_step",
})
