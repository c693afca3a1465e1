"""RMSprop step in Triton: the maths of csrc/include/dlopt/rmsprop_math.h, the storage
rules of csrc/cpu/optim_rmsprop.cpp (fp32 arithmetic; params fp32/bf16/fp16; states fp32
or the param dtype; fp32 master weights; bf16 stochastic rounding with the random bits
of rounding.h).

No host syncs: lr, grad_scale, found_inf, sr_seed and the steps stay tensors the kernel
reads (RMSprop's maths does not use the step; it is counted as torch's state keeps it).
One launch per dtype group of tensors, as the Adam kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from dlopt_kernels.backends.checks import check_rmsprop_lists
from dlopt_kernels.triton._common import (
    block_mask,
    elementwise_step,
    f64,
    fmadd,
    grad_multiplier,
    ieee_div,
    ieee_sqrt,
    l2_decayed_grad,
    load_grad,
    load_param,
    skip_found_inf,
    store_f32,
    table_start,
    tensor_ptr,
    write_param,
)


@triton.jit
def _rmsprop_kernel(table_ptr, map_ptr, lr_ptr, gs_ptr, fi_ptr, seed_ptr, alpha: tl.float64,
                    one_minus_alpha: tl.float64, eps: tl.float64, weight_decay: tl.float64,
                    momentum: tl.float64, WD: tl.constexpr, CENTERED: tl.constexpr,
                    MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GS: tl.constexpr,
                    HAS_FI: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
                    P_DT: tl.constexpr, S_DT: tl.constexpr, ALIGNED: tl.constexpr,
                    NCOL: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                    CT: tl.constexpr = tl.float32):
    # One block of one tensor (lists: params, grads, square_avgs, grad_avgs,
    # momentum buffers, masters).
    rec, n, tensor_index, start = table_start(table_ptr, map_ptr, NCOL, BLOCK * ITERS)
    p_ptr = tensor_ptr(rec, 0, P_DT, ALIGNED)
    g_ptr = tensor_ptr(rec, 1, P_DT, ALIGNED)
    v_ptr = tensor_ptr(rec, 2, S_DT, ALIGNED)
    ga_ptr = tensor_ptr(rec, 3, S_DT, ALIGNED)
    buf_ptr = tensor_ptr(rec, 4, S_DT, ALIGNED)
    master_ptr = tensor_ptr(rec, 5, tl.float32, ALIGNED)
    n = skip_found_inf(n, fi_ptr, HAS_FI)

    # rmsprop_coeffs(): fp64 host values rounded once to fp32.
    lr = tl.load(lr_ptr).to(tl.float64).to(CT)
    a = f64(alpha).to(CT)
    oma = f64(one_minus_alpha).to(CT)
    eps_f = f64(eps).to(CT)
    grad_mul = grad_multiplier(gs_ptr, MAXIMIZE, HAS_GS, CT)

    # ITERS blocks per program: the prologue above (table row, coefficients) runs
    # once per BLOCK * ITERS elements.
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = block_mask(offs, n, ALIGNED)
        # One element: rmsprop_update() line by line, all in fp32.
        g = load_grad(g_ptr, offs, mask, grad_mul, CT)
        v = tl.load(v_ptr + offs, mask=mask).to(CT)
        p = load_param(p_ptr, master_ptr, offs, mask, MASTER, CT)
        if WD:
            g = l2_decayed_grad(g, p, weight_decay, CT)
        v = fmadd(a, v, oma * (g * g))
        store_f32(v_ptr + offs, v, mask)
        # _rn: IEEE sqrt/div like the C++ kernel (plain `/` and tl.sqrt are approximate on GPU)
        if CENTERED:
            ga = tl.load(ga_ptr + offs, mask=mask).to(CT)
            ga = ga + oma * (g - ga)
            store_f32(ga_ptr + offs, ga, mask)
            avg = ieee_sqrt(v - ga * ga, CT) + eps_f
        else:
            avg = ieee_sqrt(v, CT) + eps_f
        if MOMENTUM:
            buf = tl.load(buf_ptr + offs, mask=mask).to(CT)
            buf = f64(momentum).to(CT) * buf + ieee_div(g, avg, CT)
            store_f32(buf_ptr + offs, buf, mask)
            p = p - lr * buf
        else:
            p = p - ieee_div(lr * g, avg, CT)
        write_param(p_ptr, master_ptr, p, offs, mask, seed_ptr, tensor_index, MASTER, SR)


def rmsprop_step(params, grads, square_avgs, grad_avgs, momentum_buffers, master_params,
                 state_steps, lr, alpha, eps, weight_decay, momentum, centered, maximize,
                 grad_scale, found_inf, sr_seed) -> None:
    """Triton kernel for torch.ops.dlopt.rmsprop_step (see dlopt_kernels/ops/optim_rmsprop.py)."""
    if not params:
        return
    use_momentum = momentum > 0.0  # torch: `if momentum > 0`
    gas = grad_avgs if centered else []
    bufs = momentum_buffers if use_momentum else []
    check_rmsprop_lists(params, grads, square_avgs, gas, bufs, master_params, state_steps,
                        momentum, centered, sr_seed is not None)
    elementwise_step(
        _rmsprop_kernel, [params, grads, square_avgs, gas, bufs, master_params],
        (True, False, True, True, True, True), state_steps, lr=lr, grad_scale=grad_scale,
        found_inf=found_inf, sr_seed=sr_seed,
        floats=(float(alpha), 1.0 - float(alpha), float(eps), float(weight_decay),
                float(momentum)),
        flags=dict(WD=weight_decay != 0.0, CENTERED=bool(centered), MOMENTUM=use_momentum,
                   MAXIMIZE=bool(maximize)))
