"""`torch.ops.dlopt.adagrad_step`: the multi-tensor Adagrad step (Duchi, Hazan & Singer
2011, "Adaptive Subgradient Methods for Online Learning and Stochastic Optimization";
torch.optim.Adagrad's maths).

Per element, in fp32 (csrc/include/dlopt/adagrad_math.h), with each tensor's step
incremented first:

    g   = g + weight_decay * p                   (weight_decay != 0)
    clr = lr / (1 + (step - 1) * lr_decay)       per tensor, in double, rounded once
    sum = sum + g * g
    p   = p - clr * g / (sqrt(sum) + eps)

One call updates every param of a list in one pass over memory. The op mutates
`params`, `state_sums`, `master_params` (fp32 master weights; empty for none) and
`state_steps` (each incremented by one, unless `found_inf` is non-zero: then nothing at
all changes).

`lr` is a 0-dim tensor so schedulers and torch.compile do not recompile. `grad_scale`
divides the grads (GradScaler), `sr_seed` (an int64 0-dim tensor, or None) turns on
stochastic rounding of bf16 params. `backend` is "auto" | "cpu" | "cuda" | "triton" |
"reference".
"""
from __future__ import annotations

from dlopt_kernels.ops._library import compiled, define_step

SCHEMA = (
    "adagrad_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, "
    "Tensor(c!)[] master_params, Tensor(d!)[] state_steps, Tensor lr, float lr_decay, "
    "float weight_decay, float eps, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
    "Tensor? sr_seed, str backend='auto') -> ()")

# float64 params: the C++ CPU and the Triton kernels compute in double (CUDA in fp32)
adagrad_step = define_step(SCHEMA, float64_backends=("cpu", "triton"), complex_params=True,
                           backends={
    "cpu": compiled("adagrad_step"),
    "cuda": compiled("adagrad_step"),
    "triton": "dlopt_kernels.triton.optim_adagrad:adagrad_step",
    "reference": "dlopt_kernels.backends.reference.optim_adagrad:adagrad_step",
})
