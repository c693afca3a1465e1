"""`torch.ops.dlopt.sgd_step`: the multi-tensor SGD step (torch.optim.SGD's maths).

Per element, in fp32 (csrc/include/dlopt/sgd_math.h):

    g = g + weight_decay * p                        (weight_decay != 0)
    b = g                                           (new_buffers[i]: torch's first step)
    b = momentum * b + (1 - dampening) * g          (otherwise, momentum != 0)
    g = g + momentum * b if nesterov else b         (momentum != 0)
    p = p - lr * g

One call updates every param of a list in one pass over memory. The op mutates
`params`, `momentum_buffers` (one per param when momentum != 0; ignored, and may be
empty, when momentum == 0) and `master_params` (fp32 master weights; empty for none).
`new_buffers` is empty or one bool per param: True marks a momentum buffer with no
history yet, which the step sets to the gradient without reading it (torch creates
the buffer as a clone of the gradient on a param's first step). SGD keeps no step
count. A non-zero `found_inf` skips the whole step: nothing changes.

`lr` is a 0-dim tensor so schedulers and torch.compile do not recompile. `grad_scale`
divides the grads (GradScaler), `sr_seed` (an int64 0-dim tensor, or None) turns on
stochastic rounding of bf16 params. `backend` is "auto" | "cpu" | "cuda" | "triton" |
"reference".
"""
from __future__ import annotations

from dlopt_kernels.ops._library import compiled, define_step

SCHEMA = (
    "sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
    "Tensor(c!)[] master_params, Tensor lr, float weight_decay, float momentum, "
    "float dampening, bool nesterov, bool maximize, bool[] new_buffers, "
    "Tensor? grad_scale, Tensor? found_inf, Tensor? sr_seed, str backend='auto') -> ()")

# float64 params: the C++ CPU and the Triton kernels compute in double (CUDA in fp32)
sgd_step = define_step(SCHEMA, float64_backends=("cpu", "triton"), complex_params=True, backends={
    "cpu": compiled("sgd_step"),
    "cuda": compiled("sgd_step"),
    "triton": "dlopt_kernels.triton.optim_sgd:sgd_step",
    "reference": "dlopt_kernels.backends.reference.optim_sgd:sgd_step",
})
