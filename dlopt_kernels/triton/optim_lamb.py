"""LAMB step in Triton: the maths of csrc/include/dlopt/lamb_math.h (Adam's pieces from
_common.py), the two-pass structure of csrc/cpu/optim_lamb.cpp, the storage rules of
the Adam kernel (fp32 arithmetic; params fp32/bf16/fp16; states fp32 or the param
dtype; fp32 master weights; bf16 stochastic rounding with rounding.h's random bits).

1. `_lamb_moments_kernel`, one launch per dtype group of tensors (the multi-tensor
   table of _common.py): updates m, v and writes, per program, the float64 sums of p^2
   and u^2 (u from m, v as stored) to its slots.
2. `_lamb_trust_kernel`, one program per tensor: the trust ratio from the sums in the
   tensor's range of slots, and lr * trust as the tensor's fp32 step scale.
3. `_lamb_apply_kernel`, one launch per dtype group: p -= scale * u, u recomputed.

No host syncs: lr, grad_scale, global_grad_norm, found_inf, sr_seed and the steps stay
tensors the kernels read.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from dlopt_kernels.backends.checks import check_elementwise_lists
from dlopt_kernels.triton._common import (
    LAUNCH_OPTIONS,
    TORCH_TO_TL,
    adam_bias_corrections,
    adam_direction,
    adam_moments,
    align_to_params,
    block_mask,
    block_size,
    count_steps,
    f64,
    gpu_sizes,
    l2_decayed_grad,
    load_param,
    multi_tensor_groups,
    next_step,
    on_device,
    round_to_storage,
    slot_ranges,
    store_f32,
    table_row,
    tensor_ptr,
    write_param,
)
from dlopt_kernels.triton.multi_tensor_norm import loop_iters


@triton.jit
def _coeffs(step_ptr, fi_ptr, n, beta1, beta2, HAS_FI: tl.constexpr,
            BIAS_CORRECTION: tl.constexpr):
    """lamb_coeffs (Adam's with lr = 1) from the tensor's step; n = 0 if skipped."""
    step = next_step(step_ptr)
    if HAS_FI:  # GradScaler found inf/NaN (or found_inf is NaN): touch nothing
        skip = tl.load(fi_ptr) != 0
        n = tl.where(skip, 0, n)
        step = tl.where(skip, 1.0, step)  # unused then; avoids 1/(1 - beta^0) warnings
    if BIAS_CORRECTION:
        step_size, inv_bc2_sqrt = adam_bias_corrections(tl.full((), 1.0, tl.float64), step,
                                                        beta1, beta2)
    else:
        step_size = tl.full((), 1.0, tl.float32)
        inv_bc2_sqrt = tl.full((), 1.0, tl.float32)
    return step_size, inv_bc2_sqrt, n


@triton.jit
def _direction(p, m, v, step_size, inv_bc2_sqrt, eps, weight_decay, WD: tl.constexpr):
    """lamb_direction: m_hat / (sqrt(v_hat) + eps) + weight_decay * p (l2_decayed_grad)."""
    u = adam_direction(m, v, step_size, inv_bc2_sqrt, eps)
    if WD:
        u = l2_decayed_grad(u, p, weight_decay)
    return u


@triton.jit
def _lamb_tensors(table_ptr, map_ptr, P_DT: tl.constexpr, S_DT: tl.constexpr,
                  STEP_DT: tl.constexpr, ALIGNED: tl.constexpr, NCOL: tl.constexpr,
                  BLOCK: tl.constexpr):
    """This program's tensors (lists: params, grads, exp_avgs, exp_avg_sqs, masters,
    steps), numel, tensor index and offsets."""
    rec, n, index, offs = table_row(table_ptr, map_ptr, NCOL, BLOCK)
    return (tensor_ptr(rec, 0, P_DT, ALIGNED), tensor_ptr(rec, 1, P_DT, ALIGNED),
            tensor_ptr(rec, 2, S_DT, ALIGNED), tensor_ptr(rec, 3, S_DT, ALIGNED),
            tensor_ptr(rec, 4, tl.float32, ALIGNED), tensor_ptr(rec, 5, STEP_DT), n, index,
            offs)


@triton.jit
def _lamb_moments_kernel(table_ptr, map_ptr, gs_ptr, gn_ptr, fi_ptr, part_ptr,
                         beta1: tl.float64, beta2: tl.float64,
                         one_minus_beta1: tl.float64, one_minus_beta2: tl.float64,
                         weight_decay: tl.float64, eps: tl.float64, max_grad_norm: tl.float64,
                         MASTER: tl.constexpr, HAS_GS: tl.constexpr, CLIP: tl.constexpr,
                         HAS_FI: tl.constexpr, WD: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
                         P_DT: tl.constexpr, S_DT: tl.constexpr, STEP_DT: tl.constexpr,
                         ALIGNED: tl.constexpr, NCOL: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # its slot in part_ptr (the group's part of the slots)
    p_ptr, g_ptr, m_ptr, v_ptr, master_ptr, step_ptr, n, _, offs = _lamb_tensors(
        table_ptr, map_ptr, P_DT, S_DT, STEP_DT, ALIGNED, NCOL, BLOCK)
    step_size, inv_bc2_sqrt, n = _coeffs(step_ptr, fi_ptr, n, f64(beta1), f64(beta2), HAS_FI,
                                         BIAS_CORRECTION)
    mask = block_mask(offs, n, ALIGNED)
    # 1 / grad_scale times the clip factor, in fp64, rounded once (lamb_clip_factor)
    unscale = tl.full((), 1.0, tl.float64)
    if HAS_GS:
        unscale = 1.0 / tl.load(gs_ptr).to(tl.float64)
    mul = unscale
    if CLIP:  # max_grad_norm > 0
        gn = tl.load(gn_ptr).to(tl.float64) * unscale
        max_norm = f64(max_grad_norm)
        mul = unscale * tl.where(gn > max_norm, max_norm / tl.where(gn > max_norm, gn, 1.0), 1.0)
    grad_mul = mul.to(tl.float32)

    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * grad_mul
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    m, v = adam_moments(g, m, v, f64(one_minus_beta1).to(tl.float32),
                        f64(beta2).to(tl.float32), f64(one_minus_beta2).to(tl.float32))
    store_f32(m_ptr + offs, m, mask)
    store_f32(v_ptr + offs, v, mask)
    m = round_to_storage(m, m_ptr + offs)  # u from the moments as stored
    v = round_to_storage(v, v_ptr + offs)
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER)
    u = _direction(p, m, v, step_size, inv_bc2_sqrt, f64(eps).to(tl.float32),
                   f64(weight_decay).to(tl.float32), WD)
    p64 = tl.where(mask, p, 0.0).to(tl.float64)
    u64 = tl.where(mask, u, 0.0).to(tl.float64)
    tl.store(part_ptr + 2 * pid, tl.sum(p64 * p64, axis=0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(u64 * u64, axis=0))


@triton.jit
def _lamb_trust_kernel(part_ptr, ranges_ptr, lr_ptr, scale_ptr, BLOCK: tl.constexpr,
                       ITERS: tl.constexpr):
    i = tl.program_id(0)  # tensor i's slots: [ranges[2i], ranges[2i + 1])
    lo = tl.load(ranges_ptr + 2 * i)
    hi = tl.load(ranges_ptr + 2 * i + 1)
    pp = tl.zeros((BLOCK,), tl.float64)
    uu = tl.zeros((BLOCK,), tl.float64)
    for it in range(ITERS):  # a constexpr trip count (see multi_tensor_norm.py)
        offs = lo + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < hi
        pp += tl.load(part_ptr + 2 * offs, mask=mask, other=0.0)
        uu += tl.load(part_ptr + 2 * offs + 1, mask=mask, other=0.0)
    p_norm = tl.sqrt(tl.sum(pp, axis=0))
    u_norm = tl.sqrt(tl.sum(uu, axis=0))
    ok = (p_norm > 0) & (u_norm > 0)  # lamb_trust_ratio
    trust = tl.where(ok, p_norm / tl.where(ok, u_norm, 1.0), 1.0)
    tl.store(scale_ptr + i, (tl.load(lr_ptr).to(tl.float64) * trust).to(tl.float32))


@triton.jit
def _lamb_apply_kernel(table_ptr, map_ptr, scale_ptr, fi_ptr, seed_ptr, beta1: tl.float64,
                       beta2: tl.float64, weight_decay: tl.float64, eps: tl.float64,
                       MASTER: tl.constexpr, SR: tl.constexpr, HAS_FI: tl.constexpr,
                       WD: tl.constexpr, BIAS_CORRECTION: tl.constexpr, P_DT: tl.constexpr,
                       S_DT: tl.constexpr, STEP_DT: tl.constexpr, ALIGNED: tl.constexpr,
                       NCOL: tl.constexpr, BLOCK: tl.constexpr):
    p_ptr, _, m_ptr, v_ptr, master_ptr, step_ptr, n, tensor_index, offs = _lamb_tensors(
        table_ptr, map_ptr, P_DT, S_DT, STEP_DT, ALIGNED, NCOL, BLOCK)
    step_size, inv_bc2_sqrt, n = _coeffs(step_ptr, fi_ptr, n, f64(beta1), f64(beta2), HAS_FI,
                                         BIAS_CORRECTION)
    mask = block_mask(offs, n, ALIGNED)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER)
    u = _direction(p, m, v, step_size, inv_bc2_sqrt, f64(eps).to(tl.float32),
                   f64(weight_decay).to(tl.float32), WD)
    p = p - tl.load(scale_ptr + tensor_index) * u
    write_param(p_ptr, master_ptr, p, offs, mask, seed_ptr, tensor_index, MASTER, SR)


def lamb_step(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, lr, beta1,
              beta2, weight_decay, eps, bias_correction, max_grad_norm, global_grad_norm,
              grad_scale, found_inf, sr_seed) -> None:
    """Triton kernel for torch.ops.dlopt.lamb_step (see dlopt_kernels/ops/optim_lamb.py)."""
    if not params:
        return
    check_elementwise_lists(params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
                            master_params, state_steps, sr_seed is not None,
                            op="dlopt::lamb_step")
    clip = max_grad_norm > 0.0
    if clip and global_grad_norm is None:
        raise ValueError("dlopt::lamb_step: max_grad_norm > 0 needs global_grad_norm")
    dev = params[0].device
    lr, grad_scale, global_grad_norm, found_inf, sr_seed = (
        on_device(t, dev) for t in (lr, grad_scale, global_grad_norm, found_inf, sr_seed))
    steps, finish_steps = count_steps(state_steps, found_inf, dev)
    (P, G, M, V, MP), writeback = align_to_params(
        [params, grads, exp_avgs, exp_avg_sqs, master_params], (True, False, True, True, True))
    block = block_size()
    groups = multi_tensor_groups([P, G, M, V, MP, steps], None, block, dev,
                                 split_aligned=True, key_lists=(0, 2, 5))
    offsets, total, ranges, widest = slot_ranges(groups, [p.numel() for p in P], block, dev)
    n = len(P)
    partials = torch.empty(2 * max(total, 1), dtype=torch.float64, device=dev)
    scales = torch.empty(n, dtype=torch.float32, device=dev)
    b1, b2, wd, eps = float(beta1), float(beta2), float(weight_decay), float(eps)
    flags = dict(MASTER=bool(master_params), HAS_FI=found_inf is not None, WD=wd != 0.0,
                 BIAS_CORRECTION=bool(bias_correction))
    # Absent optional tensors get a stand-in pointer that the constexpr flags never read.
    gs, gn, fi, seed = (lr if t is None else t
                        for t in (grad_scale, global_grad_norm, found_inf, sr_seed))
    warps = 4 if block > 4096 else 8
    sr = sr_seed is not None and not master_params

    def dtypes(key):  # ((param, state, step dtype), vector_ready)
        (p_dt, s_dt, step_dt), aligned = key
        return dict(P_DT=TORCH_TO_TL[p_dt], S_DT=TORCH_TO_TL[s_dt],
                    STEP_DT=TORCH_TO_TL[step_dt], ALIGNED=aligned, NCOL=3 + 6, BLOCK=block,
                    num_warps=warps)

    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        for (key, _, table, block_map, num_blocks), offset in zip(groups, offsets):
            _lamb_moments_kernel[(num_blocks,)](
                table, block_map, gs, gn, fi, partials[2 * offset:], b1, b2, 1.0 - b1,
                1.0 - b2, wd, eps, float(max_grad_norm), HAS_GS=grad_scale is not None,
                CLIP=clip, **flags, **dtypes(key), **LAUNCH_OPTIONS)
        small = 256 if gpu_sizes() else 1024
        _lamb_trust_kernel[(n,)](partials, ranges, lr, scales, BLOCK=small,
                                 ITERS=loop_iters(widest, small), **LAUNCH_OPTIONS)
        for key, _, table, block_map, num_blocks in groups:
            _lamb_apply_kernel[(num_blocks,)](
                table, block_map, scales, fi, seed, b1, b2, wd, eps,
                SR=sr and key[0][0] == torch.bfloat16, **flags, **dtypes(key), **LAUNCH_OPTIONS)
    for dst, src in writeback:
        dst.copy_(src)
    finish_steps()
    # Writes through raw pointers bypass autograd's version counters (the C++ kernels
    # bump them too); the steps were counted by a torch op already.
    torch.autograd.graph.increment_version([*params, *exp_avgs, *exp_avg_sqs, *master_params])
