"""Adagrad step in Triton: the maths of csrc/include/dlopt/adagrad_math.h, the storage
rules of csrc/cpu/optim_adagrad.cpp (fp32 arithmetic; params fp32/bf16/fp16; state_sums
fp32 or the param dtype; fp32 master weights; bf16 stochastic rounding with the random
bits of rounding.h).

No host syncs: lr, grad_scale, found_inf, sr_seed and the steps stay tensors the kernel
reads; it derives each tensor's learning rate lr / (1 + (step - 1) * lr_decay) from its
own (already counted) step in fp64, as adagrad_coeffs() does on the host. One launch per
dtype group of tensors, as the Adam kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from dlopt_kernels.triton._common import (
    block_mask,
    check_elementwise_lists,
    elementwise_step,
    f64,
    grad_multiplier,
    ieee_div,
    ieee_sqrt,
    l2_decayed_grad,
    load_grad,
    load_param,
    next_step,
    skip_found_inf,
    store_f32,
    table_start,
    tensor_ptr,
    write_param,
)


@triton.jit
def _adagrad_kernel(table_ptr, map_ptr, lr_ptr, gs_ptr, fi_ptr, seed_ptr,
                    lr_decay: tl.float64, weight_decay: tl.float64,
                    eps: tl.float64, WD: tl.constexpr, MAXIMIZE: tl.constexpr,
                    HAS_GS: tl.constexpr, HAS_FI: tl.constexpr, MASTER: tl.constexpr,
                    SR: tl.constexpr, P_DT: tl.constexpr, S_DT: tl.constexpr,
                    STEP_DT: tl.constexpr, ALIGNED: tl.constexpr, NCOL: tl.constexpr,
                    BLOCK: tl.constexpr, ITERS: tl.constexpr,
                    CT: tl.constexpr = tl.float32):
    # One block of one tensor (lists: params, grads, state sums, masters, steps).
    rec, n, tensor_index, start = table_start(table_ptr, map_ptr, NCOL, BLOCK * ITERS)
    p_ptr = tensor_ptr(rec, 0, P_DT, ALIGNED)
    g_ptr = tensor_ptr(rec, 1, P_DT, ALIGNED)
    sum_ptr = tensor_ptr(rec, 2, S_DT, ALIGNED)
    master_ptr = tensor_ptr(rec, 3, tl.float32, ALIGNED)
    step_ptr = tensor_ptr(rec, 4, STEP_DT)
    n = skip_found_inf(n, fi_ptr, HAS_FI)

    # adagrad_coeffs(): the per-tensor learning rate in fp64, rounded once to fp32.
    step = next_step(step_ptr)
    lr = tl.load(lr_ptr).to(tl.float64)
    clr = (lr / (1.0 + (step - 1.0) * f64(lr_decay))).to(CT)
    eps_f = f64(eps).to(CT)
    grad_mul = grad_multiplier(gs_ptr, MAXIMIZE, HAS_GS, CT)

    # ITERS blocks per program: the prologue above (table row, coefficients) runs
    # once per BLOCK * ITERS elements.
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = block_mask(offs, n, ALIGNED)
        # One element: adagrad_update() line by line, all in fp32.
        g = load_grad(g_ptr, offs, mask, grad_mul, CT)
        s = tl.load(sum_ptr + offs, mask=mask).to(CT)
        p = load_param(p_ptr, master_ptr, offs, mask, MASTER, CT)
        if WD:
            g = l2_decayed_grad(g, p, weight_decay, CT)
        s = s + g * g
        # _rn: IEEE sqrt/div like the C++ kernel (plain `/` and tl.sqrt are approximate on GPU)
        p = p - ieee_div(clr * g, ieee_sqrt(s, CT) + eps_f, CT)
        store_f32(sum_ptr + offs, s, mask)
        write_param(p_ptr, master_ptr, p, offs, mask, seed_ptr, tensor_index, MASTER, SR)


def adagrad_step(params, grads, state_sums, master_params, state_steps, lr, lr_decay,
                 weight_decay, eps, maximize, grad_scale, found_inf, sr_seed) -> None:
    """Triton kernel for torch.ops.dlopt.adagrad_step (see dlopt_kernels/ops/optim_adagrad.py)."""
    if not params:
        return
    check_elementwise_lists(params, grads, {"state_sums": state_sums}, master_params,
                            state_steps, sr_seed is not None, op="dlopt::adagrad_step",
                            wide=True)
    elementwise_step(
        _adagrad_kernel, [params, grads, state_sums, master_params], (True, False, True, True),
        state_steps, lr=lr, grad_scale=grad_scale, found_inf=found_inf, sr_seed=sr_seed,
        floats=(float(lr_decay), float(weight_decay), float(eps)),
        flags=dict(WD=weight_decay != 0.0, MAXIMIZE=bool(maximize)), steps_in_table=True)
