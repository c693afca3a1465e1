"""`torch.ops.dlopt.lamb_step`: the multi-tensor LAMB step (You et al. 2019, "Large
Batch Optimization for Deep Learning: Training BERT in 76 minutes",
https://arxiv.org/abs/1904.00962), with NVIDIA apex FusedLAMB's global grad-norm
clipping. Per tensor, in fp32 (csrc/include/dlopt/lamb_math.h; in double for float64
params on the cpu and reference kernels, in a call of their own):

    g  = grad / grad_scale * clip        clip = max_grad_norm / n  if n > max_grad_norm
                                         (n = global_grad_norm / grad_scale), else 1
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g^2
    u  = m_hat / (sqrt(v_hat) + eps) + weight_decay * p      (bias-corrected moments
                                                              when bias_correction)
    p -= lr * (||p|| / ||u||) * u        the trust ratio is 1 if either norm is 0

The per-tensor norms are computed in the same fused pass that updates m and v; a
second pass applies the update. The op mutates `params`, `exp_avgs`, `exp_avg_sqs`,
`master_params` (fp32 master weights; empty for none) and `state_steps` (each
incremented by one, unless `found_inf` is non-zero: then nothing at all changes).

`global_grad_norm` (a 0-dim tensor, needed when max_grad_norm > 0) is the norm of all
the grads being clipped together, as passed (before dividing by grad_scale); the
optimizer computes it with `torch.ops.dlopt.multi_tensor_norm`. `lr` is a 0-dim tensor
so schedulers and torch.compile do not recompile; `sr_seed` (an int64 0-dim tensor, or
None) turns on stochastic rounding of bf16 params. `backend` is "auto" | "cpu" | "cuda"
| "triton" | "reference".
"""
from __future__ import annotations

from dlopt_kernels.ops._library import compiled, define_step

SCHEMA = (
    "lamb_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] master_params, Tensor(e!)[] state_steps, "
    "Tensor lr, float beta1, float beta2, float weight_decay, float eps, "
    "bool bias_correction, float max_grad_norm, Tensor? global_grad_norm, "
    "Tensor? grad_scale, Tensor? found_inf, Tensor? sr_seed, str backend='auto') -> ()")

lamb_step = define_step(SCHEMA, complex_params=False, float64_backends=("cpu",), backends={
    "cpu": compiled("lamb_step"),
    "cuda": compiled("lamb_step"),
    "triton": "dlopt_kernels.triton.optim_lamb:lamb_step",
    "reference": "dlopt_kernels.backends.reference.optim_lamb:lamb_step",
})
