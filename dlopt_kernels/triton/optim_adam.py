"""Adam / AdamW step in Triton: the maths of csrc/include/dlopt/adam_math.h, the
storage rules of csrc/cpu/optim_adam.cpp (fp32 arithmetic; params fp32/bf16/fp16;
states fp32 or the param dtype; fp32 master weights; bf16 stochastic rounding with
the random bits of rounding.h).

No host syncs: lr, grad_scale, found_inf, sr_seed and the steps stay tensors that
the kernel reads; it derives the bias corrections from each tensor's own step in
fp64, as adam_coeffs() does on the host. One launch per group of tensors that share
their dtypes (_common.multi_tensor_groups).

Storage: with master weights the kernel reads and writes the fp32 master and stores
the param rounded to nearest (stochastic rounding is only for bf16 params without
masters, as in the C++ kernel); an fp32 param's master is updated too, as in the
reference. Steps may live on the params' device (no sync) or on the CPU (one sync).
"""
from __future__ import annotations

import triton
import triton.language as tl

from dlopt_kernels.triton._common import (
    adam_bias_corrections,
    adam_direction,
    adam_moments,
    bf16_stochastic,
    block_mask,
    check_elementwise_lists,
    decayed_minus,
    decoupled_decay_factor,
    elementwise_step,
    f64,
    grad_multiplier,
    l2_decayed_grad,
    load_grad,
    load_param,
    next_step,
    sr_tensor_key,
    store_f32,
    table_start,
    tensor_ptr,
)

_WD_NONE, _WD_L2, _WD_DECOUPLED = 0, 1, 2


@triton.jit
def _adam_kernel(table_ptr, map_ptr, lr_ptr, gs_ptr, fi_ptr, seed_ptr,
                 beta1: tl.float64, beta2: tl.float64, one_minus_beta1: tl.float64,
                 one_minus_beta2: tl.float64, weight_decay: tl.float64, eps: tl.float64,
                 WD: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                 HAS_GS: tl.constexpr, HAS_FI: tl.constexpr, MASTER: tl.constexpr,
                 SR: tl.constexpr, P_DT: tl.constexpr, S_DT: tl.constexpr,
                 STEP_DT: tl.constexpr, CT: tl.constexpr, ALIGNED: tl.constexpr,
                 NCOL: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # One block of one tensor of the group (multi_tensor_groups' table); the lists'
    # order: params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps.
    rec, n, tensor_index, start = table_start(table_ptr, map_ptr, NCOL, BLOCK * ITERS)
    p_ptr = tensor_ptr(rec, 0, P_DT, ALIGNED)
    g_ptr = tensor_ptr(rec, 1, P_DT, ALIGNED)
    m_ptr = tensor_ptr(rec, 2, S_DT, ALIGNED)
    v_ptr = tensor_ptr(rec, 3, S_DT, ALIGNED)
    vmax_ptr = tensor_ptr(rec, 4, S_DT, ALIGNED)
    master_ptr = tensor_ptr(rec, 5, tl.float32, ALIGNED)
    step = next_step(tensor_ptr(rec, 6, STEP_DT))
    if HAS_FI:  # GradScaler found inf/NaN (or found_inf is NaN): touch nothing
        skip = tl.load(fi_ptr) != 0
        n = tl.where(skip, 0, n)
        step = tl.where(skip, 1.0, step)  # unused then; avoids 1/(1 - beta^0) warnings

    # Per-tensor coefficients in fp64, rounded once to the arithmetic's type CT (fp32;
    # fp64 for float64 params): adam_coeffs().
    lr = tl.load(lr_ptr).to(tl.float64)
    b1 = f64(beta1)
    b2 = f64(beta2)
    step_size, inv_bc2_sqrt = adam_bias_corrections(lr, step, b1, b2, CT)
    omb1 = f64(one_minus_beta1).to(CT)
    omb2 = f64(one_minus_beta2).to(CT)
    beta2_f = b2.to(CT)
    eps_f = f64(eps).to(CT)
    wd = f64(weight_decay)
    grad_mul = grad_multiplier(gs_ptr, MAXIMIZE, HAS_GS, CT)

    # ITERS blocks per program: the prologue above (table row, coefficients) runs
    # once per BLOCK * ITERS elements.
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = block_mask(offs, n, ALIGNED)
        # One element: adam_update() line by line, all in CT.
        g = load_grad(g_ptr, offs, mask, grad_mul, CT)
        m = tl.load(m_ptr + offs, mask=mask).to(CT)
        v = tl.load(v_ptr + offs, mask=mask).to(CT)
        p = load_param(p_ptr, master_ptr, offs, mask, MASTER, CT)
        if WD == 1:  # _WD_L2 (Adam)
            g = l2_decayed_grad(g, p, weight_decay, CT)
        m, v = adam_moments(g, m, v, omb1, beta2_f, omb2)
        v_hat = v
        if AMSGRAD:
            vmax = tl.load(vmax_ptr + offs, mask=mask).to(CT)
            vmax = tl.where(vmax > v, vmax, v)  # as C++ `vmax > v ? vmax : v`, NaN included
            store_f32(vmax_ptr + offs, vmax, mask)
            v_hat = vmax
        step_p = adam_direction(m, v_hat, step_size, inv_bc2_sqrt, eps_f, CT)
        if WD == 2:  # _WD_DECOUPLED (AdamW): p * (1 - lr * wd) - step, one rounding
            p = decayed_minus(p, decoupled_decay_factor(lr, wd, CT), step_p)
        else:
            p = p - step_p

        store_f32(m_ptr + offs, m, mask)
        store_f32(v_ptr + offs, v, mask)
        if MASTER:
            tl.store(master_ptr + offs, p, mask=mask)
        if SR:  # bf16 params only; the result is exactly representable in bf16
            p = bf16_stochastic(p, sr_tensor_key(seed_ptr, tensor_index), offs)
        store_f32(p_ptr + offs, p, mask)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
              state_steps, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
              decoupled_weight_decay, grad_scale, found_inf, sr_seed) -> None:
    """Triton kernel for torch.ops.dlopt.adam_step (see dlopt_kernels/ops/optim_adam.py)."""
    if not params:
        return
    states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    states.update({"max_exp_avg_sqs": max_exp_avg_sqs} if amsgrad else {})
    check_elementwise_lists(params, grads, states, master_params, state_steps,
                            sr_seed is not None, op="dlopt::adam_step", wide=True)
    # Hyperparameters go in as fp64 (`1 - beta` exact in double, as adam_coeffs()).
    elementwise_step(
        _adam_kernel, [params, grads, exp_avgs, exp_avg_sqs,
                       max_exp_avg_sqs if amsgrad else [], master_params],
        (True, False, True, True, True, True), state_steps, lr=lr, grad_scale=grad_scale,
        found_inf=found_inf, sr_seed=sr_seed,
        floats=(float(beta1), float(beta2), 1.0 - float(beta1), 1.0 - float(beta2),
                float(weight_decay), float(eps)),
        flags=dict(WD=(_WD_NONE if weight_decay == 0.0 else
                       _WD_DECOUPLED if decoupled_weight_decay else _WD_L2),
                   AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize)),
        steps_in_table=True)
