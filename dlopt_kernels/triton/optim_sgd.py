"""SGD step in Triton: the maths of csrc/include/dlopt/sgd_math.h, the storage rules of
csrc/cpu/optim_sgd.cpp (fp32 arithmetic; params fp32/bf16/fp16; momentum buffers fp32
or the param dtype; fp32 master weights; bf16 stochastic rounding with the random bits
of rounding.h).

No host syncs: lr, grad_scale, found_inf and sr_seed stay tensors the kernel reads.
SGD keeps no step count. One launch per dtype group of tensors, as the Adam kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from dlopt_kernels.backends.checks import check_sgd_lists
from dlopt_kernels.triton._common import (
    block_mask,
    elementwise_step,
    f64,
    fmadd,
    grad_multiplier,
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
def _sgd_kernel(table_ptr, map_ptr, lr_ptr, gs_ptr, fi_ptr, seed_ptr,
                weight_decay: tl.float64, momentum: tl.float64,
                one_minus_dampening: tl.float64, WD: tl.constexpr, MOMENTUM: tl.constexpr,
                NESTEROV: tl.constexpr, FIRST: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_GS: tl.constexpr, HAS_FI: tl.constexpr, MASTER: tl.constexpr,
                SR: tl.constexpr, P_DT: tl.constexpr, S_DT: tl.constexpr,
                ALIGNED: tl.constexpr, NCOL: tl.constexpr, BLOCK: tl.constexpr,
                ITERS: tl.constexpr,
                CT: tl.constexpr = tl.float32):
    # One block of one tensor (lists: params, grads, momentum buffers, masters).
    rec, n, tensor_index, start = table_start(table_ptr, map_ptr, NCOL, BLOCK * ITERS)
    p_ptr = tensor_ptr(rec, 0, P_DT, ALIGNED)
    g_ptr = tensor_ptr(rec, 1, P_DT, ALIGNED)
    buf_ptr = tensor_ptr(rec, 2, S_DT, ALIGNED)
    master_ptr = tensor_ptr(rec, 3, tl.float32, ALIGNED)
    n = skip_found_inf(n, fi_ptr, HAS_FI)

    # sgd_coeffs(): fp64 host values rounded once to fp32.
    lr = tl.load(lr_ptr).to(tl.float64).to(CT)
    mom = f64(momentum).to(CT)
    omd = f64(one_minus_dampening).to(CT)
    grad_mul = grad_multiplier(gs_ptr, MAXIMIZE, HAS_GS, CT)

    # ITERS blocks per program: the prologue above (table row, coefficients) runs
    # once per BLOCK * ITERS elements.
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = block_mask(offs, n, ALIGNED)
        # One element: sgd_update() line by line, all in fp32.
        g = load_grad(g_ptr, offs, mask, grad_mul, CT)
        p = load_param(p_ptr, master_ptr, offs, mask, MASTER, CT)
        if WD:
            g = l2_decayed_grad(g, p, weight_decay, CT)
        if MOMENTUM:
            if FIRST:  # the buffer has no history: it becomes g
                buf = g
            else:
                buf = tl.load(buf_ptr + offs, mask=mask).to(CT)
                buf = fmadd(mom, buf, omd * g)
            store_f32(buf_ptr + offs, buf, mask)
            if NESTEROV:
                g = g + mom * buf
            else:
                g = buf
        p = p - lr * g
        write_param(p_ptr, master_ptr, p, offs, mask, seed_ptr, tensor_index, MASTER, SR)


def sgd_step(params, grads, momentum_buffers, master_params, lr, weight_decay, momentum,
             dampening, nesterov, maximize, new_buffers, grad_scale, found_inf,
             sr_seed) -> None:
    """Triton kernel for torch.ops.dlopt.sgd_step (see dlopt_kernels/ops/optim_sgd.py)."""
    use_momentum = momentum != 0.0
    bufs = momentum_buffers if use_momentum else []
    check_sgd_lists(params, grads, bufs, master_params, momentum, new_buffers,
                    sr_seed is not None)
    if not params:
        return
    elementwise_step(
        _sgd_kernel, [params, grads, bufs, master_params], (True, False, True, True), [],
        lr=lr, grad_scale=grad_scale, found_inf=found_inf, sr_seed=sr_seed,
        floats=(float(weight_decay), float(momentum), 1.0 - float(dampening)),
        flags=dict(WD=weight_decay != 0.0, MOMENTUM=use_momentum,
                   NESTEROV=bool(nesterov) and use_momentum, MAXIMIZE=bool(maximize)),
        # a buffer with no history becomes the grad: its own specialization
        extra_key=lambda i: dict(FIRST=use_momentum and bool(new_buffers)
                                 and bool(new_buffers[i])))
