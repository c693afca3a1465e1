"""multi_tensor_norm in Triton: the maths of csrc/include/dlopt/norm_math.h and the
structure of csrc/cuda/multi_tensor_norm.cu, in three kernels, none of which waits for
the host:

1. `_partials_kernel`, one launch per dtype group of tensors (the multi-tensor table of
   _common.py): each program reduces BLOCK elements (fp32 terms, fp32 tree sum) to one
   float64 partial at its slot in a shared buffer (the groups' slots side by side).
2. `_finish_kernel`, one program per tensor: combines the partials in the tensor's range
   of slots in float64 into its raw value and its norm.
3. `_total_kernel`, one program: the total from the raw values.

Kinds (norm_math.h NormKind): 0 L2, 1 L1, 2 inf, 3 -inf, 4 L0 (count), 5 any other p.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from dlopt_kernels.triton._common import (
    LAUNCH_OPTIONS,
    TORCH_TO_TL,
    block_mask,
    block_size,
    f64,
    gpu_sizes,
    is_dense,
    multi_tensor_groups,
    slot_ranges,
    table_row,
    tensor_ptr,
)

_KINDS = {2.0: 0, 1.0: 1, float("inf"): 2, float("-inf"): 3, 0.0: 4}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _identity(KIND: tl.constexpr):
    if KIND == 3:
        r = float("inf")
    else:
        r = 0.0
    return r


@triton.jit
def _term(x, p, KIND: tl.constexpr):
    """norm_term in fp32; |x|^p as exp2(p log2 |x|) (0 -> 0 for p > 0, inf for p < 0)."""
    if KIND == 0:
        t = x * x
    elif KIND == 4:
        t = tl.where(x != 0, 1.0, 0.0)
    elif KIND == 5:
        a = tl.abs(x)
        zero = a == 0  # log2(0) = -inf would do too, but warns in the interpreter
        t = tl.math.exp2(p * tl.math.log2(tl.where(zero, 1.0, a)))
        t = tl.where(zero, tl.where(p > 0, 0.0, float("inf")), t)
    else:
        t = tl.abs(x)
    return t


@triton.jit
def _combine(a, b, KIND: tl.constexpr):
    """norm_combine, elementwise: sum, or max / min where NaN wins."""
    if KIND == 2:
        r = tl.where((b > a) | (b != b), b, a)
    elif KIND == 3:
        r = tl.where((b < a) | (b != b), b, a)
    else:
        r = a + b
    return r


@triton.jit
def _reduce(v, KIND: tl.constexpr):
    """A block of values to one, with norm_combine (NaN propagating for max / min)."""
    if KIND == 2 or KIND == 3:
        nans = tl.sum((v != v).to(tl.int32), axis=0)
        if KIND == 2:
            r = tl.max(v, axis=0)
        else:
            r = tl.min(v, axis=0)
        r = tl.where(nans > 0, float("nan"), r)
    else:
        r = tl.sum(v, axis=0)
    return r


@triton.jit
def _partials_kernel(table_ptr, map_ptr, out_ptr, p: tl.float64, KIND: tl.constexpr,
                     X_DT: tl.constexpr, ALIGNED: tl.constexpr, NCOL: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # its slot in out_ptr (the group's part of the slots)
    rec, n, _, offs = table_row(table_ptr, map_ptr, NCOL, BLOCK)
    x_ptr = tensor_ptr(rec, 0, X_DT, ALIGNED)
    mask = block_mask(offs, n, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = _term(x, f64(p).to(tl.float32), KIND)
    t = tl.where(mask, t, _identity(KIND))
    tl.store(out_ptr + pid, _reduce(t, KIND).to(tl.float64))


@triton.jit
def _finish(raw, p, KIND: tl.constexpr):
    """norm_finish: sqrt in fp64; raw^(1/p) in fp32 (no fp64 exp/log everywhere)."""
    if KIND == 0:
        r = tl.sqrt(raw)
    elif KIND == 5:
        r32 = raw.to(tl.float32)
        zero = r32 == 0
        r = tl.math.exp2(tl.math.log2(tl.where(zero, 1.0, r32)) / p.to(tl.float32))
        r = tl.where(zero, tl.where(p > 0, 0.0, float("inf")), r).to(tl.float64)
    else:
        r = raw
    return r


@triton.jit
def _finish_kernel(part_ptr, ranges_ptr, raw_ptr, norms_ptr, p: tl.float64, KIND: tl.constexpr,
                   BLOCK: tl.constexpr, ITERS: tl.constexpr):
    i = tl.program_id(0)  # tensor i's slots: [ranges[2i], ranges[2i + 1])
    lo = tl.load(ranges_ptr + 2 * i)
    hi = tl.load(ranges_ptr + 2 * i + 1)
    acc = tl.full((BLOCK,), _identity(KIND), tl.float64)
    # A constexpr trip count (loop_iters()): the triton 3.6 interpreter (with numpy 2)
    # cannot loop to a runtime bound, loaded or passed in.
    for it in range(ITERS):
        offs = lo + it * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(part_ptr + offs, mask=offs < hi, other=_identity(KIND))
        acc = _combine(acc, v, KIND)
    raw = _reduce(acc, KIND)
    tl.store(raw_ptr + i, raw)
    tl.store(norms_ptr + i, _finish(raw, f64(p), KIND).to(tl.float32))


@triton.jit
def _total_kernel(raw_ptr, n, total_ptr, p: tl.float64, KIND: tl.constexpr, BLOCK: tl.constexpr,
                  ITERS: tl.constexpr):
    acc = tl.full((BLOCK,), _identity(KIND), tl.float64)
    for it in range(ITERS):
        offs = it * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(raw_ptr + offs, mask=offs < n, other=_identity(KIND))
        if KIND == 4:  # norm_total_add: count the tensors with a non-zero norm
            v = tl.where(v != 0, 1.0, 0.0)
        acc = _combine(acc, v, KIND)
    total = _reduce(acc, KIND)
    if KIND != 4:
        total = _finish(total, f64(p), KIND)
    tl.store(total_ptr, total.to(tl.float32))


def loop_iters(count: int, block: int) -> int:
    """Trip count of a kernel loop over `count` items, BLOCK at a time, as a constexpr:
    rounded up to a power of two so that few variants get compiled."""
    return triton.next_power_of_2(max(1, triton.cdiv(count, block)))


def multi_tensor_norm(tensors, norm_type):
    """Triton kernel for torch.ops.dlopt.multi_tensor_norm (see dlopt_kernels/ops/)."""
    dev = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != dev:
            raise ValueError(f"dlopt::multi_tensor_norm: tensors[{i}] is on {t.device} but "
                             f"tensors[0] is on {dev}; call it once per device")
        if t.dtype not in _DTYPES:
            raise TypeError(f"dlopt::multi_tensor_norm: tensors[{i}] has dtype {t.dtype}; "
                            "float32, bfloat16, float16 or float64 only")
    p = float(norm_type)
    kind = _KINDS.get(p, 5)
    block = block_size()
    xs = [t if is_dense(t) else t.contiguous() for t in tensors]
    groups = multi_tensor_groups([xs], None, block, dev, split_aligned=True, key_lists=(0,))
    offsets, slots, ranges, widest = slot_ranges(groups, [x.numel() for x in xs], block, dev)
    n = len(xs)
    partials = torch.empty(max(slots, 1), dtype=torch.float64, device=dev)
    raws = torch.empty(n, dtype=torch.float64, device=dev)
    norms = torch.empty(n, dtype=torch.float32, device=dev)
    total = torch.empty((), dtype=torch.float32, device=dev)
    small = 256 if gpu_sizes() else 1024
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        for (((dtype,), aligned), _, table, block_map, num_blocks), offset in zip(groups, offsets):
            _partials_kernel[(num_blocks,)](
                table, block_map, partials[offset:], p, KIND=kind, X_DT=TORCH_TO_TL[dtype],
                ALIGNED=aligned, NCOL=4, BLOCK=block, num_warps=4 if block > 4096 else 8,
                **LAUNCH_OPTIONS)
        _finish_kernel[(n,)](partials, ranges, raws, norms, p, KIND=kind,
                             BLOCK=small, ITERS=loop_iters(widest, small), **LAUNCH_OPTIONS)
        _total_kernel[(1,)](raws, n, total, p, KIND=kind, BLOCK=small,
                            ITERS=loop_iters(n, small), **LAUNCH_OPTIONS)
    return norms, total
