"""`torch.ops.dlopt.lion_step`: the multi-tensor Lion step (Chen et al. 2023,
"Symbolic Discovery of Optimization Algorithms", https://arxiv.org/abs/2302.06675).

Per element, in fp32 (csrc/include/dlopt/lion_math.h):

    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

One call updates every param of a list in one pass over memory. The op mutates
`params`, `exp_avgs`, `master_params` (fp32 master weights; empty for none) and
`state_steps` (each incremented by one, unless `found_inf` is non-zero: then nothing
at all changes). Lion's maths does not use the step count; it is kept as every other
optimizer's state keeps it.

`lr` is a 0-dim tensor so schedulers and torch.compile do not recompile. `grad_scale`
divides the grads (GradScaler), `sr_seed` (an int64 0-dim tensor, or None) turns on
stochastic rounding of bf16 params. `backend` is "auto" | "cpu" | "cuda" | "triton" |
"reference".
"""
from __future__ import annotations

from dlopt_kernels.ops._library import compiled, define_step

SCHEMA = (
    "lion_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] master_params, Tensor(d!)[] state_steps, Tensor lr, float beta1, "
    "float beta2, float weight_decay, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
    "Tensor? sr_seed, str backend='auto') -> ()")

# float64 params: the C++ CPU and the Triton kernels compute in double (CUDA in fp32)
lion_step = define_step(SCHEMA, float64_backends=("cpu", "triton"), complex_params=False, backends={
    "cpu": compiled("lion_step"),
    "cuda": compiled("lion_step"),
    "triton": "dlopt_kernels.triton.optim_lion:lion_step",
    "reference": "dlopt_kernels.backends.reference.optim_lion:lion_step",
})
