"""Adafactor step in Triton: the maths of csrc/include/dlopt/adafactor_math.h (torch's
Adafactor; fp32 element arithmetic, sums of squares in fp64), the storage rules of
csrc/cpu/optim_adafactor.cpp (params fp32/bf16/fp16; states fp32 or the param dtype;
fp32 master weights; bf16 stochastic rounding with the random bits of rounding.h).

On the device and without host syncs (lr, step, grad_scale, found_inf and sr_seed stay
tensors the kernels read), one launch per kernel for each group of tensors with the same
dtypes (addresses from tables cached by content, as triton/_common.py's):

  matrices (>= 2-D, walked as [batch, rows, cols] tiles of whole rows; a table row per
  tensor, see _matrix_row):
    _stats_kernel      row sums of g^2 (stored), column sums (fp64 atomics), sum(p^2)
    _factors_kernel    one program per matrix: row_var / col_var lerp towards the means,
                       den = max(mean(row_var), eps1)
    _direction_kernel  sum(u^2) (fp64 atomics)
    _apply_kernel      p = p * (1 - lr wd) - alpha / max(1, rms(u) / d) * u
  0-/1-D tensors (launch_multi_tensor):
    _vector_direction_kernel  the variance lerp, sum(u^2) and sum(p^2)
    _vector_apply_kernel      the update, as _apply_kernel

Non-contiguous tensors get contiguous stand-ins (copied back when written).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from dlopt_kernels.backends.checks import check_factored_lists
from dlopt_kernels.triton._common import (
    LAUNCH_OPTIONS,
    TORCH_TO_TL,
    _cached,
    block_mask,
    count_steps,
    decayed_minus,
    decoupled_decay_factor,
    f64,
    gpu_sizes,
    grad_multiplier,
    launch_multi_tensor,
    load_param,
    next_step,
    on_device,
    round_to_storage,
    store_f32,
    table_row,
    tensor_ptr,
    write_param,
)


@triton.jit
def _limit(fi_ptr, count, HAS_FI: tl.constexpr):
    """`count`, or 0 when GradScaler found inf/NaN (found_inf != 0, NaN included): the
    kernels mask their stores with `index < limit`, so a skipped step stores nothing."""
    if HAS_FI:
        count = tl.where(tl.load(fi_ptr) != 0, 0, count)
    return count


@triton.jit
def _coeffs(step_ptr, lr_ptr, beta2_decay, weight_decay):
    """adafactor_math.h adafactor_coeffs from the device step: (lerp weight in fp32, rho
    and lr in fp64, decay factor in fp32). t^beta2_decay goes through fp32 exp2/log2
    (no fp64 transcendentals without libdevice): a few fp32 ulps off the host's pow,
    exact at t = 1."""
    step = next_step(step_ptr)
    step = tl.where(step > 0, step, 1.0)  # a skipped step is never 0 here; keep log2 finite
    w = tl.math.exp2(f64(beta2_decay).to(tl.float32) * tl.math.log2(step.to(tl.float32)))
    lr = tl.load(lr_ptr).to(tl.float64)
    inv_sqrt = 1.0 / tl.sqrt(step)
    rho = tl.where(lr < inv_sqrt, lr, inv_sqrt)
    return w, rho, decoupled_decay_factor(lr, f64(weight_decay))


@triton.jit
def _tile(pid_r, b, c0, R, C, BR: tl.constexpr, BC: tl.constexpr):
    """Offsets and mask of rows [pid_r BR, +BR) x cols [c0, +BC) of matrix b."""
    rows = pid_r * BR + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    offs = (b.to(tl.int64) * R + rows[:, None]) * C + cols[None, :]
    return rows, cols, offs, (rows[:, None] < R) & (cols[None, :] < C)


# Matrices (>= 2-D tensors) of one dtype group share one launch per kernel: a table
# row per tensor (columns below), a map from each program to its row. Tile programs
# (stats, direction, apply) cover (matrix b, block of BR rows); the factors kernel runs
# one program per matrix. The row/column sums and den of all tensors sit side by side
# in three scratch buffers, at the row's offsets.
# Columns 0-4 (first tile program, first matrix program, R, C, row blocks per matrix)
# are read by _matrix_row; tensor_ptr's column k is table column 3 + k.
_F_INDEX = tl.constexpr(5)
_F_NUMEL = tl.constexpr(6)
_F_P = tl.constexpr(7)
_F_G = tl.constexpr(8)
_F_MASTER = tl.constexpr(9)
_F_RV = tl.constexpr(10)
_F_CV = tl.constexpr(11)
_F_STEP = tl.constexpr(12)
_F_ROW_SUM = tl.constexpr(13)
_F_COL_SUM = tl.constexpr(14)
_F_DEN = tl.constexpr(15)
_F_NCOL = 16


@triton.jit
def _matrix_row(table_ptr, map_ptr, TILES: tl.constexpr):
    """This program's table row, (R, C), matrix b and row block (0 unless TILES)."""
    pid = tl.program_id(0)
    rec = table_ptr + tl.load(map_ptr + pid).to(tl.int64) * 16  # _F_NCOL
    R = tl.load(rec + 2)  # _F_R
    C = tl.load(rec + 3)  # _F_C
    if TILES:
        local = pid - tl.load(rec + 0)  # _F_FIRST_TILE
        nrb = tl.load(rec + 4)  # _F_NRB
        b = local // nrb
        pid_r = local % nrb
    else:
        b = pid - tl.load(rec + 1)  # _F_FIRST_MAT
        pid_r = b * 0
    return rec, R, C, b.to(tl.int64), pid_r


@triton.jit
def _stats_kernel(table_ptr, map_ptr, row_sum_ptr, col_sum_ptr, sum_p2_ptr, gs_ptr,
                  MAXIMIZE: tl.constexpr, HAS_GS: tl.constexpr, MASTER: tl.constexpr,
                  P_DT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rec, R, C, b, pid_r = _matrix_row(table_ptr, map_ptr, True)
    p_ptr = tensor_ptr(rec, _F_P - 3, P_DT)
    g_ptr = tensor_ptr(rec, _F_G - 3, P_DT)
    master_ptr = tensor_ptr(rec, _F_MASTER - 3, tl.float32)
    tensor_index = tl.load(rec + _F_INDEX)
    row_sum_ptr += tl.load(rec + _F_ROW_SUM)
    col_sum_ptr += tl.load(rec + _F_COL_SUM)
    mul = grad_multiplier(gs_ptr, MAXIMIZE, HAS_GS)
    rs = tl.zeros((BR,), tl.float64)
    ps = tl.zeros((BR,), tl.float64)
    for c0 in range(0, C, BC):
        rows, cols, offs, mask = _tile(pid_r, b, c0, R, C, BR, BC)
        g = (tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * mul).to(tl.float64)
        p = load_param(p_ptr, master_ptr, offs, mask, MASTER).to(tl.float64)
        p = tl.where(mask, p, 0.0)
        rs += tl.sum(g * g, axis=1)
        ps += tl.sum(p * p, axis=1)
        tl.atomic_add(col_sum_ptr + b * C + cols, tl.sum(g * g, axis=0), mask=cols < C)
    rows = pid_r * BR + tl.arange(0, BR)
    tl.store(row_sum_ptr + b * R + rows, rs, mask=rows < R)
    tl.atomic_add(sum_p2_ptr + tensor_index, tl.sum(ps, axis=0))


@triton.jit
def _factors_kernel(table_ptr, map_ptr, row_sum_ptr, col_sum_ptr, den_ptr, lr_ptr, fi_ptr,
                    beta2_decay: tl.float64, weight_decay: tl.float64, eps1: tl.float64,
                    HAS_FI: tl.constexpr, S_DT: tl.constexpr, STEP_DT: tl.constexpr,
                    BLOCK: tl.constexpr):
    rec, R, C, b, _ = _matrix_row(table_ptr, map_ptr, False)
    row_var_ptr = tensor_ptr(rec, _F_RV - 3, S_DT)
    col_var_ptr = tensor_ptr(rec, _F_CV - 3, S_DT)
    step_ptr = tensor_ptr(rec, _F_STEP - 3, STEP_DT)
    row_sum_ptr += tl.load(rec + _F_ROW_SUM)
    col_sum_ptr += tl.load(rec + _F_COL_SUM)
    den_ptr += tl.load(rec + _F_DEN)
    r_store = _limit(fi_ptr, R, HAS_FI)
    c_store = _limit(fi_ptr, C, HAS_FI)
    w, _, _ = _coeffs(step_ptr, lr_ptr, beta2_decay, weight_decay)
    total = tl.zeros((BLOCK,), tl.float64)
    for r0 in range(0, R, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        m = r < R
        mean = (tl.load(row_sum_ptr + b * R + r, mask=m, other=0.0) / C).to(tl.float32)
        old = tl.load(row_var_ptr + b * R + r, mask=m, other=0.0).to(tl.float32)
        new = tl.where(w < 0.5, old + w * (mean - old), mean - (mean - old) * (1.0 - w))
        new = round_to_storage(new, row_var_ptr)  # as stored: what the next kernels read
        store_f32(row_var_ptr + b * R + r, new, r < r_store)
        total += tl.where(m, new.to(tl.float64), 0.0)
    den = (tl.sum(total, axis=0) / R).to(tl.float32)
    eps1_f = f64(eps1).to(tl.float32)
    den = tl.where(den < eps1_f, eps1_f, den)  # clamp_min, NaN kept
    tl.store(den_ptr + b, den)
    for c0 in range(0, C, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        m = c < C
        mean = (tl.load(col_sum_ptr + b * C + c, mask=m, other=0.0) / R).to(tl.float32)
        old = tl.load(col_var_ptr + b * C + c, mask=m, other=0.0).to(tl.float32)
        new = tl.where(w < 0.5, old + w * (mean - old), mean - (mean - old) * (1.0 - w))
        store_f32(col_var_ptr + b * C + c, new, c < c_store)


@triton.jit
def _direction(g, v, eps1_sq):
    """adafactor_math.h adafactor_direction: g / sqrt(max(v, eps1^2)), NaN kept."""
    v = tl.where(v < eps1_sq, eps1_sq, v)
    return g * tl.math.div_rn(1.0, tl.sqrt_rn(v))


@triton.jit
def _factored_direction(rec, g_ptr, row_var_ptr, col_var_ptr, den, b, pid_r, c0, R, C, mul,
                        eps1_sq, BR: tl.constexpr, BC: tl.constexpr):
    """The update direction u of one tile of matrix b, and the tile's (rows, offsets,
    mask)."""
    rows, cols, offs, mask = _tile(pid_r, b, c0, R, C, BR, BC)
    rv = tl.load(row_var_ptr + b * R + rows, mask=rows < R, other=0.0).to(tl.float32)
    cv = tl.load(col_var_ptr + b * C + cols, mask=cols < C, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * mul
    u = _direction(g, tl.math.div_rn(rv[:, None] * cv[None, :], den), eps1_sq)
    return u, rows, cols, offs, mask


@triton.jit
def _direction_kernel(table_ptr, map_ptr, den_ptr, sum_u2_ptr, gs_ptr, eps1: tl.float64,
                      MAXIMIZE: tl.constexpr, HAS_GS: tl.constexpr, P_DT: tl.constexpr,
                      S_DT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rec, R, C, b, pid_r = _matrix_row(table_ptr, map_ptr, True)
    g_ptr = tensor_ptr(rec, _F_G - 3, P_DT)
    row_var_ptr = tensor_ptr(rec, _F_RV - 3, S_DT)
    col_var_ptr = tensor_ptr(rec, _F_CV - 3, S_DT)
    den = tl.load(den_ptr + tl.load(rec + _F_DEN) + b)
    mul = grad_multiplier(gs_ptr, MAXIMIZE, HAS_GS)
    eps1_sq = (f64(eps1) * f64(eps1)).to(tl.float32)
    us = tl.zeros((BR,), tl.float64)
    for c0 in range(0, C, BC):
        u, rows, cols, offs, mask = _factored_direction(rec, g_ptr, row_var_ptr, col_var_ptr,
                                                        den, b, pid_r, c0, R, C, mul,
                                                        eps1_sq, BR, BC)
        u = tl.where(mask, u, 0.0).to(tl.float64)
        us += tl.sum(u * u, axis=1)
    tl.atomic_add(sum_u2_ptr + tl.load(rec + _F_INDEX), tl.sum(us, axis=0))


@triton.jit
def _step_size(sum_p2_ptr, sum_u2_ptr, tensor_index, n, rho, eps2: tl.float64,
               d: tl.float64):
    """adafactor_math.h adafactor_step_size, in fp32 (Python's max(x, nan) is x)."""
    sqrt_n = tl.sqrt(n.to(tl.float64))
    rms_p = tl.sqrt(tl.load(sum_p2_ptr + tensor_index)) / sqrt_n
    rms_u = tl.sqrt(tl.load(sum_u2_ptr + tensor_index)) / (sqrt_n * f64(d))
    alpha = tl.where(rms_p > f64(eps2), rms_p, f64(eps2)) * rho
    return (alpha / tl.where(rms_u > 1.0, rms_u, 1.0)).to(tl.float32)


@triton.jit
def _apply_kernel(table_ptr, map_ptr, den_ptr, sum_p2_ptr, sum_u2_ptr, lr_ptr, gs_ptr, fi_ptr,
                  seed_ptr, beta2_decay: tl.float64, weight_decay: tl.float64,
                  eps1: tl.float64, eps2: tl.float64, d: tl.float64, WD: tl.constexpr,
                  MAXIMIZE: tl.constexpr, HAS_GS: tl.constexpr, HAS_FI: tl.constexpr,
                  MASTER: tl.constexpr, SR: tl.constexpr, P_DT: tl.constexpr,
                  S_DT: tl.constexpr, STEP_DT: tl.constexpr, BR: tl.constexpr,
                  BC: tl.constexpr):
    rec, R, C, b, pid_r = _matrix_row(table_ptr, map_ptr, True)
    p_ptr = tensor_ptr(rec, _F_P - 3, P_DT)
    g_ptr = tensor_ptr(rec, _F_G - 3, P_DT)
    master_ptr = tensor_ptr(rec, _F_MASTER - 3, tl.float32)
    row_var_ptr = tensor_ptr(rec, _F_RV - 3, S_DT)
    col_var_ptr = tensor_ptr(rec, _F_CV - 3, S_DT)
    step_ptr = tensor_ptr(rec, _F_STEP - 3, STEP_DT)
    tensor_index = tl.load(rec + _F_INDEX)
    den = tl.load(den_ptr + tl.load(rec + _F_DEN) + b)
    mul = grad_multiplier(gs_ptr, MAXIMIZE, HAS_GS)
    eps1_sq = (f64(eps1) * f64(eps1)).to(tl.float32)
    _, rho, decay = _coeffs(step_ptr, lr_ptr, beta2_decay, weight_decay)
    step = _step_size(sum_p2_ptr, sum_u2_ptr, tensor_index, tl.load(rec + _F_NUMEL), rho,
                      eps2, d)
    for c0 in range(0, C, BC):
        u, rows, cols, offs, mask = _factored_direction(rec, g_ptr, row_var_ptr, col_var_ptr,
                                                        den, b, pid_r, c0, R, C, mul,
                                                        eps1_sq, BR, BC)
        p = load_param(p_ptr, master_ptr, offs, mask, MASTER)
        if WD:
            p = decayed_minus(p, decay, step * u)
        else:
            p = p - step * u
        store = (rows[:, None] < _limit(fi_ptr, R, HAS_FI)) & (cols[None, :] < C)
        write_param(p_ptr, master_ptr, p, offs, store, seed_ptr, tensor_index, MASTER, SR)


@triton.jit
def _vector_row(table_ptr, map_ptr, NCOL: tl.constexpr, BLOCK: tl.constexpr,
                P_DT: tl.constexpr, S_DT: tl.constexpr, STEP_DT: tl.constexpr,
                ALIGNED: tl.constexpr):
    """One block of one 0-/1-D tensor: (numel, index, offsets, param, grad, variance,
    master and step pointers); lists: params, grads, variances, masters, steps."""
    rec, n, tensor_index, offs = table_row(table_ptr, map_ptr, NCOL, BLOCK)
    return (n, tensor_index, offs, tensor_ptr(rec, 0, P_DT, ALIGNED),
            tensor_ptr(rec, 1, P_DT, ALIGNED), tensor_ptr(rec, 2, S_DT, ALIGNED),
            tensor_ptr(rec, 3, tl.float32, ALIGNED), tensor_ptr(rec, 4, STEP_DT))


@triton.jit
def _vector_direction_kernel(table_ptr, map_ptr, sum_p2_ptr, sum_u2_ptr, lr_ptr, gs_ptr,
                             fi_ptr, beta2_decay: tl.float64, weight_decay: tl.float64,
                             eps1: tl.float64, MAXIMIZE: tl.constexpr, HAS_GS: tl.constexpr,
                             HAS_FI: tl.constexpr, MASTER: tl.constexpr, P_DT: tl.constexpr,
                             S_DT: tl.constexpr, STEP_DT: tl.constexpr, ALIGNED: tl.constexpr,
                             NCOL: tl.constexpr, BLOCK: tl.constexpr):
    n, tensor_index, offs, p_ptr, g_ptr, var_ptr, master_ptr, step_ptr = _vector_row(
        table_ptr, map_ptr, NCOL, BLOCK, P_DT, S_DT, STEP_DT, ALIGNED)
    mul = grad_multiplier(gs_ptr, MAXIMIZE, HAS_GS)
    eps1_sq = (f64(eps1) * f64(eps1)).to(tl.float32)
    w, _, _ = _coeffs(step_ptr, lr_ptr, beta2_decay, weight_decay)
    mask = block_mask(offs, n, ALIGNED)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * mul
    old = tl.load(var_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g2 = g * g
    v = tl.where(w < 0.5, old + w * (g2 - old), g2 - (g2 - old) * (1.0 - w))
    v = round_to_storage(v, var_ptr)
    store_f32(var_ptr + offs, v, block_mask(offs, _limit(fi_ptr, n, HAS_FI), ALIGNED))
    u = tl.where(mask, _direction(g, v, eps1_sq), 0.0).to(tl.float64)
    p = tl.where(mask, load_param(p_ptr, master_ptr, offs, mask, MASTER), 0.0)
    p = p.to(tl.float64)
    tl.atomic_add(sum_u2_ptr + tensor_index, tl.sum(u * u, axis=0))
    tl.atomic_add(sum_p2_ptr + tensor_index, tl.sum(p * p, axis=0))


@triton.jit
def _vector_apply_kernel(table_ptr, map_ptr, sum_p2_ptr, sum_u2_ptr, lr_ptr, gs_ptr, fi_ptr,
                         seed_ptr, beta2_decay: tl.float64, weight_decay: tl.float64,
                         eps1: tl.float64, eps2: tl.float64, d: tl.float64, WD: tl.constexpr,
                         MAXIMIZE: tl.constexpr, HAS_GS: tl.constexpr, HAS_FI: tl.constexpr,
                         MASTER: tl.constexpr, SR: tl.constexpr, P_DT: tl.constexpr,
                         S_DT: tl.constexpr, STEP_DT: tl.constexpr, ALIGNED: tl.constexpr,
                         NCOL: tl.constexpr, BLOCK: tl.constexpr):
    n, tensor_index, offs, p_ptr, g_ptr, var_ptr, master_ptr, step_ptr = _vector_row(
        table_ptr, map_ptr, NCOL, BLOCK, P_DT, S_DT, STEP_DT, ALIGNED)
    mul = grad_multiplier(gs_ptr, MAXIMIZE, HAS_GS)
    eps1_sq = (f64(eps1) * f64(eps1)).to(tl.float32)
    _, rho, decay = _coeffs(step_ptr, lr_ptr, beta2_decay, weight_decay)
    step = _step_size(sum_p2_ptr, sum_u2_ptr, tensor_index, n, rho, eps2, d)
    mask = block_mask(offs, n, ALIGNED)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * mul
    v = tl.load(var_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = _direction(g, v, eps1_sq)
    p = load_param(p_ptr, master_ptr, offs, mask, MASTER)
    if WD:
        p = decayed_minus(p, decay, step * u)
    else:
        p = p - step * u
    store = block_mask(offs, _limit(fi_ptr, n, HAS_FI), ALIGNED)
    write_param(p_ptr, master_ptr, p, offs, store, seed_ptr, tensor_index, MASTER, SR)


def _tiles():
    """(rows, cols) per program: few, huge programs for the interpreter (~0.9 ms each)."""
    return (8, 512) if gpu_sizes() else (64, 1024)


def _matrix_tables(idx, params, grads, master_params, rv_of, cv_of, steps, contiguous, br,
                   device):
    """The table (columns _F_*) and program maps of one group of matrices, cached by
    content like triton/_common.py's, (tile programs, matrices, row-sum and col-sum
    sizes), and the tensors the table points to (contiguous stand-ins included), which
    the caller keeps alive until the kernels are launched."""
    rows, tile_counts, mat_counts, keep = [], [], [], []
    tiles = mats = n_rows = n_cols = 0
    for i in idx:
        p = contiguous(params[i], True)
        g = contiguous(grads[i], False)
        mp = contiguous(master_params[i], True) if master_params else p
        rv, cv = contiguous(rv_of[i], True), contiguous(cv_of[i], True)
        keep += [p, g, mp, rv, cv]
        r, c = p.shape[-2], p.shape[-1]
        batch, nrb = p.numel() // (r * c), triton.cdiv(r, br)
        rows.append([tiles, mats, r, c, nrb, i, p.numel(), p.data_ptr(), g.data_ptr(),
                     mp.data_ptr(), rv.data_ptr(), cv.data_ptr(), steps[i].data_ptr(),
                     n_rows, n_cols, mats])
        tile_counts.append(batch * nrb)
        mat_counts.append(batch)
        tiles, mats = tiles + batch * nrb, mats + batch
        n_rows, n_cols = n_rows + batch * r, n_cols + batch * c
    flat = tuple(v for row in rows for v in row)
    table = _cached(("adafactor", device, flat),
                    lambda: torch.tensor(flat, dtype=torch.int64).to(device))

    def program_map(counts):
        return _cached(("adafactor_map", device, tuple(counts)), lambda: torch.repeat_interleave(
            torch.arange(len(counts), dtype=torch.int32),
            torch.tensor(counts, dtype=torch.int64)).to(device))

    return (table, program_map(tile_counts), program_map(mat_counts),
            (tiles, mats, n_rows, n_cols), keep)


def adafactor_step(params, grads, row_vars, col_vars, variances, master_params, state_steps,
                   lr, beta2_decay, eps1, eps2, d, weight_decay, maximize, grad_scale,
                   found_inf, sr_seed) -> None:
    """Triton kernels for torch.ops.dlopt.adafactor_step (see
    dlopt_kernels/ops/optim_adafactor.py)."""
    if not params:
        return
    check_factored_lists(params, grads, row_vars, col_vars, variances, master_params,
                         state_steps, sr_seed is not None)
    dev = params[0].device
    lr, grad_scale, found_inf, sr_seed = (on_device(t, dev)
                                          for t in (lr, grad_scale, found_inf, sr_seed))
    steps, finish_steps = count_steps(state_steps, found_inf, dev)
    writeback = []

    def contiguous(t, mutated):
        if t.is_contiguous():
            return t
        c = t.contiguous()
        if mutated:
            writeback.append((t, c))
        return c

    n = len(params)
    sums = torch.zeros(2, n, dtype=torch.float64, device=dev)  # sum(p^2), sum(u^2)
    floats = dict(beta2_decay=float(beta2_decay), weight_decay=float(weight_decay),
                  eps1=float(eps1))
    flags = dict(MAXIMIZE=bool(maximize), HAS_GS=grad_scale is not None,
                 HAS_FI=found_inf is not None, MASTER=bool(master_params))
    br, bc = _tiles()
    warps = 8 if gpu_sizes() else 4
    gs, fi, seed = (lr if t is None else t for t in (grad_scale, found_inf, sr_seed))
    sr_of = (lambda dtype: sr_seed is not None and not master_params
             and dtype == torch.bfloat16)
    # Unfactored (0-/1-D) tensors, by their index in the op's lists: one launch per
    # dtype group for each of their two kernels. The others' rows hold an empty stand-in,
    # which multi_tensor_groups skips.
    vector = [i for i, p0 in enumerate(params) if p0.dim() < 2 and p0.numel()]
    if vector:
        empty = params[0].new_empty(0)
        P, G, V, MP = ([empty] * n for _ in range(4))
        var_of = dict(zip((i for i, p0 in enumerate(params) if p0.dim() < 2), variances))
        for i in vector:
            P[i] = contiguous(params[i], True)
            G[i] = contiguous(grads[i], False)
            V[i] = contiguous(var_of[i], True)
            MP[i] = contiguous(master_params[i], True) if master_params else P[i]
        lists = [P, G, V, MP, list(steps)]
        key_lists = (0, 2, 4)  # (param, variance, step) dtypes
        consts_of = (lambda key: dict(P_DT=TORCH_TO_TL[key[0]], S_DT=TORCH_TO_TL[key[1]],
                                      STEP_DT=TORCH_TO_TL[key[2]]))
        launch_multi_tensor(_vector_direction_kernel, lists, None, consts_of,
                            (sums[0], sums[1], lr, gs, fi, *floats.values()), flags, dev,
                            key_lists=key_lists)
    factored = [i for i, p0 in enumerate(params) if p0.dim() >= 2]
    rv_of, cv_of = dict(zip(factored, row_vars)), dict(zip(factored, col_vars))
    groups: dict = {}
    for i in factored:
        if params[i].numel():  # a zero-size one: its step was still counted above
            groups.setdefault((params[i].dtype, rv_of[i].dtype, steps[i].dtype), []).append(i)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        for key, idx in groups.items():
            table, tile_map, mat_map, sizes, _keep = _matrix_tables(
                idx, params, grads, master_params, rv_of, cv_of, steps, contiguous, br, dev)
            tiles, mats, n_rows, n_cols = sizes
            row_sum = torch.empty(n_rows, dtype=torch.float64, device=dev)
            col_sum = torch.zeros(n_cols, dtype=torch.float64, device=dev)
            den = torch.empty(mats, dtype=torch.float32, device=dev)
            dts = dict(P_DT=TORCH_TO_TL[key[0]], S_DT=TORCH_TO_TL[key[1]])
            _stats_kernel[(tiles,)](table, tile_map, row_sum, col_sum, sums[0], gs,
                                    MAXIMIZE=flags["MAXIMIZE"], HAS_GS=flags["HAS_GS"],
                                    MASTER=flags["MASTER"], P_DT=dts["P_DT"], BR=br, BC=bc,
                                    num_warps=warps, **LAUNCH_OPTIONS)
            _factors_kernel[(mats,)](table, mat_map, row_sum, col_sum, den, lr, fi, **floats,
                                     HAS_FI=flags["HAS_FI"], S_DT=dts["S_DT"],
                                     STEP_DT=TORCH_TO_TL[key[2]], BLOCK=br * bc,
                                     num_warps=warps, **LAUNCH_OPTIONS)
            _direction_kernel[(tiles,)](table, tile_map, den, sums[1], gs, eps1=float(eps1),
                                        MAXIMIZE=flags["MAXIMIZE"], HAS_GS=flags["HAS_GS"],
                                        **dts, BR=br, BC=bc, num_warps=warps,
                                        **LAUNCH_OPTIONS)
            _apply_kernel[(tiles,)](table, tile_map, den, sums[0], sums[1], lr, gs, fi, seed,
                                    **floats, eps2=float(eps2), d=float(d),
                                    WD=weight_decay != 0.0, **flags, SR=sr_of(key[0]), **dts,
                                    STEP_DT=TORCH_TO_TL[key[2]], BR=br, BC=bc,
                                    num_warps=warps, **LAUNCH_OPTIONS)
    if vector:  # after the direction kernel above: stream order
        launch_multi_tensor(
            _vector_apply_kernel, lists, None,
            lambda key: dict(consts_of(key), SR=sr_of(key[0])),
            (sums[0], sums[1], lr, gs, fi, seed, *floats.values(), float(eps2), float(d)),
            dict(flags, WD=weight_decay != 0.0), dev, key_lists=key_lists)
    for dst, src in writeback:
        dst.copy_(src)
    finish_steps()
    torch.autograd.graph.increment_version(
        [*params, *row_vars, *col_vars, *variances, *master_params])
