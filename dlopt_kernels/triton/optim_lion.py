"""Lion step in Triton: the maths of csrc/include/dlopt/lion_math.h, the storage rules
of csrc/cpu/optim_lion.cpp (fp32 arithmetic; params fp32/bf16/fp16; exp_avg fp32 or
the param dtype; fp32 master weights; bf16 stochastic rounding with the random bits of
rounding.h).

No host syncs: lr, grad_scale, found_inf, sr_seed and the steps stay tensors the
kernel reads. One launch per dtype group of tensors, as the Adam kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from dlopt_kernels.triton._common import (
    block_mask,
    check_elementwise_lists,
    decayed_minus,
    decoupled_decay_factor,
    elementwise_step,
    f64,
    fmadd,
    grad_multiplier,
    load_grad,
    load_param,
    skip_found_inf,
    store_f32,
    table_start,
    tensor_ptr,
    write_param,
)


@triton.jit
def _lion_kernel(table_ptr, map_ptr, lr_ptr, gs_ptr, fi_ptr, seed_ptr, beta1: tl.float64,
                 beta2: tl.float64, one_minus_beta1: tl.float64, one_minus_beta2: tl.float64,
                 weight_decay: tl.float64, WD: tl.constexpr, MAXIMIZE: tl.constexpr,
                 HAS_GS: tl.constexpr, HAS_FI: tl.constexpr, MASTER: tl.constexpr,
                 SR: tl.constexpr, P_DT: tl.constexpr, S_DT: tl.constexpr,
                 ALIGNED: tl.constexpr, NCOL: tl.constexpr, BLOCK: tl.constexpr,
                 ITERS: tl.constexpr,
                 CT: tl.constexpr = tl.float32):
    # One block of one tensor (lists: params, grads, exp_avgs, masters).
    rec, n, tensor_index, start = table_start(table_ptr, map_ptr, NCOL, BLOCK * ITERS)
    p_ptr = tensor_ptr(rec, 0, P_DT, ALIGNED)
    g_ptr = tensor_ptr(rec, 1, P_DT, ALIGNED)
    m_ptr = tensor_ptr(rec, 2, S_DT, ALIGNED)
    master_ptr = tensor_ptr(rec, 3, tl.float32, ALIGNED)
    n = skip_found_inf(n, fi_ptr, HAS_FI)

    # lion_coeffs(): fp64 host values rounded once to fp32.
    lr = tl.load(lr_ptr).to(tl.float64)
    lr_f = lr.to(CT)
    b1 = f64(beta1).to(CT)
    b2 = f64(beta2).to(CT)
    omb1 = f64(one_minus_beta1).to(CT)
    omb2 = f64(one_minus_beta2).to(CT)
    grad_mul = grad_multiplier(gs_ptr, MAXIMIZE, HAS_GS, CT)

    # ITERS blocks per program: the prologue above (table row, coefficients) runs
    # once per BLOCK * ITERS elements.
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = block_mask(offs, n, ALIGNED)
        # One element: lion_update() line by line, all in fp32.
        g = load_grad(g_ptr, offs, mask, grad_mul, CT)
        m = tl.load(m_ptr + offs, mask=mask).to(CT)
        p = load_param(p_ptr, master_ptr, offs, mask, MASTER, CT)
        u = fmadd(b1, m, omb1 * g)
        sign = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, u * 0.0))  # lion_math.h sign_of
        step = lr_f * sign
        if WD:
            p = decayed_minus(p, decoupled_decay_factor(lr, f64(weight_decay), CT), step)
        else:
            p = p - step
        m = fmadd(b2, m, omb2 * g)

        store_f32(m_ptr + offs, m, mask)
        write_param(p_ptr, master_ptr, p, offs, mask, seed_ptr, tensor_index, MASTER, SR)


def lion_step(params, grads, exp_avgs, master_params, state_steps, lr, beta1, beta2,
              weight_decay, maximize, grad_scale, found_inf, sr_seed) -> None:
    """Triton kernel for torch.ops.dlopt.lion_step (see dlopt_kernels/ops/optim_lion.py)."""
    if not params:
        return
    check_elementwise_lists(params, grads, {"exp_avgs": exp_avgs}, master_params, state_steps,
                            sr_seed is not None, op="dlopt::lion_step", wide=True)
    elementwise_step(
        _lion_kernel, [params, grads, exp_avgs, master_params], (True, False, True, True),
        state_steps, lr=lr, grad_scale=grad_scale, found_inf=found_inf, sr_seed=sr_seed,
        floats=(float(beta1), float(beta2), 1.0 - float(beta1), 1.0 - float(beta2),
                float(weight_decay)),
        flags=dict(WD=weight_decay != 0.0, MAXIMIZE=bool(maximize)))
