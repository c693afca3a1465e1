"""`torch.ops.dlopt.rmsprop_step`: the multi-tensor RMSprop step (Hinton, Srivastava &
Swersky, "Neural Networks for Machine Learning", lecture 6e; centered variant of Graves
2013; torch.optim.RMSprop's maths).

Per element, in fp32 (csrc/include/dlopt/rmsprop_math.h):

    g   = g + weight_decay * p                      (weight_decay != 0)
    v   = alpha * v + (1 - alpha) * g * g
    ga  = ga + (1 - alpha) * (g - ga)               (centered)
    avg = sqrt(v - ga * ga) + eps                   (centered; sqrt(v) + eps otherwise)
    b   = momentum * b + g / avg;  p = p - lr * b   (momentum > 0)
    p   = p - lr * g / avg                          (otherwise)

One call updates every param of a list in one pass over memory. The op mutates
`params`, `square_avgs`, `grad_avgs` (one per param when centered; ignored, and may be
empty, otherwise), `momentum_buffers` (one per param when momentum > 0; ignored
otherwise), `master_params` (fp32 master weights; empty for none) and `state_steps`
(each incremented by one, unless `found_inf` is non-zero: then nothing at all changes;
the maths does not use the step).

`lr` is a 0-dim tensor so schedulers and torch.compile do not recompile. `grad_scale`
divides the grads (GradScaler), `sr_seed` (an int64 0-dim tensor, or None) turns on
stochastic rounding of bf16 params. `backend` is "auto" | "cpu" | "cuda" | "triton" |
"reference".
"""
from __future__ import annotations

from dlopt_kernels.ops._library import compiled, define_step

SCHEMA = (
    "rmsprop_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
    "Tensor(c!)[] grad_avgs, Tensor(d!)[] momentum_buffers, Tensor(e!)[] master_params, "
    "Tensor(f!)[] state_steps, Tensor lr, float alpha, float eps, float weight_decay, "
    "float momentum, bool centered, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
    "Tensor? sr_seed, str backend='auto') -> ()")

# float64 params: the C++ CPU and the Triton kernels compute in double (CUDA in fp32)
rmsprop_step = define_step(SCHEMA, float64_backends=("cpu", "triton"), complex_params=True,
                           backends={
    "cpu": compiled("rmsprop_step"),
    "cuda": compiled("rmsprop_step"),
    "triton": "dlopt_kernels.triton.optim_rmsprop:rmsprop_step",
    "reference": "dlopt_kernels.backends.reference.optim_rmsprop:rmsprop_step",
})
