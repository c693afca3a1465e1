"""Helpers every Triton optimizer kernel shares: device-side bit tricks that must
match csrc/include/dlopt/rounding.h bit for bit, fp64 scalar maths for per-tensor
coefficients, and the host-side plumbing (layout alignment, device scalars, step
counters) that keeps a launcher free of host syncs.

Interpreter rules (TRITON_INTERPRET=1, how the CPU tests run these kernels): float
kernel arguments arrive as Python floats there but as typed scalars when compiled,
so kernels declare them `tl.float64` and read them through `f64()`; no libdevice;
clamp before any float->int cast.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# shared with the reference backend (no triton there), re-exported for the kernels here
from dlopt_kernels import _lib
from dlopt_kernels.backends.checks import check_elementwise_lists  # noqa: E402,F401


# Every launch passes these. No FMA contraction: a compiled kernel then rounds each
# multiply and add as the C++ CPU kernels (-ffp-contract=off) and the interpreter do
# (the fused ones are written out: `fmadd`), and, more to the point, the same maths
# gives the same bits whatever Triton specializes (a grad_scale present or not,
# aligned or offset views): with contraction the compiler fused different pairs in
# different specializations (seen on an H200). The kernels are memory-bound, so the
# extra instructions cost nothing measurable.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# What the environment says about launch sizes, read once per process (a step reads it
# on every call, and the variables cost ~1 us each to look up): gpu_sizes' flag and
# launch_sizes' triple. reset_launch_sizes() after changing a variable.
_SIZES: dict = {}


def reset_launch_sizes() -> None:
    """Forget the launch sizes read from the environment, so the next launch reads
    DLOPT_TRITON_BLOCK / _ITERS / _WARPS (and DLOPT_TRITON_GPU_SIZES) again: for
    tools/triton_sizes.py, which times one setting after another, and tests."""
    _SIZES.clear()


def gpu_sizes() -> bool:
    """Whether launches take a GPU's sizes (blocks, tiles, warps). Not in the
    interpreter, which pays ~0.9 ms per program instance and so gets few, huge
    programs; except when tools/check_triton.py records the launches a GPU would
    compile (DLOPT_TRITON_GPU_SIZES=1)."""
    hit = _SIZES.get("gpu")
    if hit is None:
        hit = _SIZES["gpu"] = (not interpreted()
                               or os.environ.get("DLOPT_TRITON_GPU_SIZES", "0") == "1")
    return hit


def block_size() -> int:
    return 4096 if gpu_sizes() else 65536


# Element-wise launches (launch_multi_tensor): BLOCK elements per loop trip, ITERS
# trips per program, num_warps. The environment variables override the defaults, for
# the A/B timing of tools/triton_sizes.py on a GPU.
_SIZE_VARS = (("DLOPT_TRITON_BLOCK", 64, 1 << 17), ("DLOPT_TRITON_ITERS", 1, 256),
              ("DLOPT_TRITON_WARPS", 1, 32))


def launch_sizes() -> tuple[int, int, int]:
    """(BLOCK, ITERS, num_warps) of the element-wise kernels (the variables are read
    once: reset_launch_sizes)."""
    hit = _SIZES.get("launch")
    if hit is None:
        sizes = [block_size(), 1, 8 if gpu_sizes() else 4]
        for k, (var, lo, hi) in enumerate(_SIZE_VARS):
            raw = os.environ.get(var)
            if raw:
                try:
                    v = int(raw)
                except ValueError:
                    v = 0
                if not (lo <= v <= hi and v & (v - 1) == 0):
                    raise ValueError(f"dlopt: {var}={raw!r} must be a power of two in "
                                     f"[{lo}, {hi}]")
                sizes[k] = v
        hit = _SIZES["launch"] = (sizes[0], sizes[1], sizes[2])
    return hit


# ---------------------------------------------------------------- device side


@triton.jit
def f64(x):
    """An fp64 scalar from a `tl.float64` argument: a no-op when compiled; exact
    (not rounded through fp32, as a bare Python float would be) in the interpreter."""
    return tl.full((), x, tl.float64)


@triton.jit
def mix32(x):
    """rounding.h mix32 ("lowbias32") on uint32 values; wraps mod 2^32 like C."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def sr_tensor_key(seed_ptr, tensor_index):
    """rounding.h sr_tensor_key(uint32(seed), tensor_index); seed is an int64 tensor."""
    seed = (tl.load(seed_ptr) & 0xFFFFFFFF).to(tl.uint32)
    return mix32(seed ^ (tensor_index.to(tl.uint32) * 0x9E3779B9))


@triton.jit
def _bf16_round(x, rnd):
    """Add `rnd` below the bf16 mantissa and truncate; the fp32 value of the bf16
    result comes back (low 16 bits zero, so `.to(bf16)` is exact everywhere). NaN
    becomes 0x7FC0 as in rounding.h; inf + noise stays inf."""
    bits = (x.to(tl.uint32, bitcast=True) + rnd) & 0xFFFF0000
    bits = tl.where(x != x, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def bf16_stochastic(x, key, offs):
    """rounding.h bf16_bits_stochastic(x, sr_random(key, offs)), as an fp32 value."""
    return _bf16_round(x, mix32(offs.to(tl.uint32) ^ key) & 0xFFFF)


@triton.jit
def store_f32(ptrs, x, mask):
    """Store fp32 `x` in the pointee dtype, rounding to nearest-even. bf16 goes
    through rounding.h bf16_bits_rne by hand: the interpreter's fp32->bf16 cast
    truncates, and this keeps it bit-identical to the C++ kernels."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        x = _bf16_round(x, 0x7FFF + ((u >> 16) & 1))
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def pow_f64(base, e):
    """base ** e in fp64 (no fp64 exp/log in the interpreter or without libdevice):
    square-and-multiply over the integer part, which is exact to a few fp64 ulps, so
    the fp32 coefficients match a host `pow` in double. Steps are whole numbers;
    a fractional part, if any, is applied in fp32."""
    e = tl.where(e > 0, e, 0.0)  # also maps NaN to 0 before the int cast
    e = tl.where(e < 1073741824.0, e, 1073741824.0)  # beta ** 2^30 has underflowed
    k = e.to(tl.int32)
    frac = (e - k.to(tl.float64)).to(tl.float32)
    r = tl.full((), 1.0, tl.float64)
    b = base
    while k > 0:
        r = tl.where((k & 1) != 0, r * b, r)
        b = b * b
        k = k >> 1
    b32 = base.to(tl.float32)
    fpart = tl.math.exp2(frac * tl.math.log2(tl.where(b32 > 0, b32, 1.0)))
    fpart = tl.where(b32 > 0, fpart, 0.0)
    return tl.where(frac > 0, r * fpart.to(tl.float64), r)


@triton.jit
def grad_multiplier(gs_ptr, MAXIMIZE: tl.constexpr, HAS_GS: tl.constexpr,
                    CT: tl.constexpr = tl.float32):
    """cpu_multi_tensor.h grad_multiplier: (maximize ? -1 : 1) / grad_scale in fp64,
    rounded once to the arithmetic's type CT (fp32; fp64 for float64 params; gs_ptr is
    not read unless HAS_GS)."""
    sign = -1.0 if MAXIMIZE else 1.0
    if HAS_GS:
        mul = (sign / tl.load(gs_ptr).to(tl.float64)).to(CT)
    else:
        mul = tl.full((), sign, CT)
    return mul


@triton.jit
def skip_found_inf(n, fi_ptr, HAS_FI: tl.constexpr):
    """The element count a program walks: 0 when GradScaler found an inf/NaN (or
    found_inf is NaN), so the step touches nothing, as the C++ kernels' skip_step."""
    if HAS_FI:
        n = tl.where(tl.load(fi_ptr) != 0, 0, n)
    return n


@triton.jit
def load_grad(g_ptr, offs, mask, grad_mul, CT: tl.constexpr = tl.float32):
    """The grad as an update reads it: upcast to CT, times grad_multiplier."""
    return tl.load(g_ptr + offs, mask=mask).to(CT) * grad_mul


@triton.jit
def l2_decayed_grad(g, p, weight_decay, CT: tl.constexpr = tl.float32):
    """weight_decay.h l2_decayed_grad: g + weight_decay * p (weight_decay an fp64
    argument, rounded once to CT), with one rounding in fp64 and two in fp32, as there."""
    if CT == tl.float64:
        return fmadd(f64(weight_decay).to(CT), p, g)
    return g + f64(weight_decay).to(CT) * p


@triton.jit
def decoupled_decay_factor(lr, weight_decay, CT: tl.constexpr = tl.float32):
    """weight_decay.h: 1 - lr * weight_decay from fp64 values, rounded once to CT."""
    return (1.0 - lr.to(tl.float64) * weight_decay).to(CT)


@triton.jit
def load_param(p_ptr, master_ptr, offs, mask, MASTER: tl.constexpr, CT: tl.constexpr = tl.float32):
    """cpu_storage.h load_param: the value an update starts from, in CT (the fp32
    master copy under MASTER, else the param upcast)."""
    if MASTER:
        p = tl.load(master_ptr + offs, mask=mask)
    else:
        p = tl.load(p_ptr + offs, mask=mask).to(CT)
    return p


@triton.jit
def write_param(p_ptr, master_ptr, p, offs, mask, seed_ptr, tensor_index,
                MASTER: tl.constexpr, SR: tl.constexpr):
    """cpu_storage.h write_param: the updated fp32 `p` into the master (MASTER) and the
    param, rounded to nearest, or stochastically (SR: bf16 params without masters)."""
    if MASTER:
        tl.store(master_ptr + offs, p, mask=mask)
    if SR:  # the result is exactly representable in bf16
        p = bf16_stochastic(p, sr_tensor_key(seed_ptr, tensor_index), offs)
    store_f32(p_ptr + offs, p, mask)


@triton.jit
def round_to_storage(x, ptrs):
    """fp32 `x` as store_f32 would store it into `ptrs`, read back as fp32 (bf16 and
    fp16 rounded to nearest-even; fp32 unchanged): what a later load will see."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        x = _bf16_round(x, 0x7FFF + ((u >> 16) & 1))
    elif ptrs.dtype.element_ty == tl.float16:
        x = x.to(tl.float16).to(tl.float32)
    return x


# --- Adam's maths, shared with LAMB (twins of adam_math.h) ---------------------------


@triton.jit
def adam_bias_corrections(lr, step, beta1, beta2, CT: tl.constexpr = tl.float32):
    """adam_coeffs: (lr / (1 - beta1^step), 1 / sqrt(1 - beta2^step)) from fp64 lr,
    step and betas, each rounded once to CT."""
    step_size = (lr / (1.0 - pow_f64(beta1, step))).to(CT)
    inv_bc2_sqrt = (1.0 / tl.sqrt(1.0 - pow_f64(beta2, step))).to(CT)  # fp64: IEEE
    return step_size, inv_bc2_sqrt


@triton.jit
def fmadd(a, b, c):
    """weight_decay.h fmadd: a * b + c rounded once, where the C++ and CUDA kernels
    round once (the kernels' only FMAs: LAUNCH_OPTIONS fuses nothing else), so every
    backend computes the same bits."""
    return tl.math.fma(a, b, c)


@triton.jit
def decayed_minus(p, decay_factor, delta):
    """weight_decay.h decayed_minus: p * decay_factor - delta, one rounding."""
    return fmadd(p, decay_factor, -delta)


@triton.jit
def adam_moments(g, m, v, one_minus_beta1, beta2, one_minus_beta2):
    """adam_moments (fp32): the new (m, v)."""
    m = m + one_minus_beta1 * (g - m)
    v = fmadd(beta2, v, one_minus_beta2 * (g * g))
    return m, v


@triton.jit
def ieee_div(x, y, CT: tl.constexpr = tl.float32):
    """x / y rounded to nearest in CT, like the C++ kernels: fp32 `/` is approximate on
    GPUs (div_rn is the IEEE one, fp32 only); fp64 `/` is IEEE already."""
    if CT == tl.float64:
        q = x / y
    else:
        q = tl.math.div_rn(x, y)
    return q


@triton.jit
def ieee_sqrt(x, CT: tl.constexpr = tl.float32):
    """sqrt rounded to nearest in CT (tl.sqrt_rn for fp32; fp64 sqrt is IEEE)."""
    if CT == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def adam_direction(m, v_hat, step_size, inv_bc2_sqrt, eps, CT: tl.constexpr = tl.float32):
    """adam_direction (in CT): step_size * m / (sqrt(v_hat) * inv_bc2_sqrt + eps), with
    IEEE sqrt and division like the C++ kernel (ieee_div, ieee_sqrt)."""
    return step_size * ieee_div(m, ieee_sqrt(v_hat, CT) * inv_bc2_sqrt + eps, CT)


# ------------------------------------------------------------------ host side


def on_device(t, device):
    """A 0-dim hyperparameter tensor on `device` (lr or found_inf may live on the CPU
    while params are on CUDA); a copy, never a sync or `.item()`."""
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


def count_steps(steps, found_inf, device):
    """The step tensors the kernels read, on `device`, still holding the count before
    this step (kernels that use it take `next_step`), and a function to call once the
    launches are queued that adds one to every step unless found_inf != 0 (stream order:
    after the kernels read them), without a host sync.

    Why after: the count is one or three torch ops (found_inf == 0, its cast, the
    foreach add), each a launch; before the kernels they are host time the GPU waits
    through, after them they overlap the kernels' run."""
    def inc(dtype):
        return 1 if found_inf is None else (found_inf.reshape(()) == 0).to(dtype)

    native = _lib.c_function("on_device")
    same = native(steps, steps[0]) if native is not None and type(steps) is list else None
    if same is None:
        same = all(s.device == steps[0].device for s in steps)
    if same and steps[0].device == device:
        return steps, lambda: torch._foreach_add_(steps, inc(steps[0].dtype))
    # Steps kept on the CPU for CUDA params (torch's non-capturable layout): the kernels
    # read a device copy, counted there and copied back afterwards (one sync).
    buf = torch.stack([s.detach().reshape(()).to(device, torch.float64) for s in steps])

    def finish():
        buf.add_(inc(buf.dtype))
        for s, v in zip(steps, buf.cpu()):
            s.copy_(v)

    return list(buf.unbind()), finish


@triton.jit
def next_step(step_ptr):
    """This step's count from its tensor's count before it (count_steps), as fp64: the
    add in the tensor's own dtype, as the C++ kernels' `*sp += 1.0f` for float32 steps."""
    return (tl.load(step_ptr) + 1).to(tl.float64)


def is_dense(t) -> bool:
    """ATen's is_non_overlapping_and_dense (not exposed in Python): some permutation
    of the dims makes `t` contiguous."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def align_to_params(lists, mutated):
    """Python twin of csrc/include/dlopt/tensor_lists.h AlignedLists. Kernels walk a
    param and its per-param tensors with one flat index over memory, which is only
    right when all share one dense layout: give each tensor that does not (a
    transposed grad, a non-dense param) a scratch copy in the param's layout.
    Returns (lists, writeback); after the kernels, `dst.copy_(src)` each writeback
    pair to put mutated scratch copies back into the caller's tensors."""
    lists = [list(lst) for lst in lists]
    writeback = []
    others = [k for k in range(1, len(lists)) if lists[k]]
    for i, p in enumerate(lists[0]):
        # the common case first: contiguous tensors of one shape share one flat layout
        if p.is_contiguous() and all(lists[k][i].is_contiguous() for k in others):
            continue
        if not is_dense(p):
            pw = p.contiguous()
            if mutated[0]:
                writeback.append((p, pw))
            lists[0][i] = p = pw
        for k in range(1, len(lists)):
            if not lists[k]:
                continue
            t = lists[k][i]
            if t.stride() == p.stride() and is_dense(t):
                continue
            tw = torch.empty_like(p, dtype=t.dtype)  # keeps p's (dense) strides
            tw.copy_(t)
            if mutated[k]:
                writeback.append((t, tw))
            lists[k][i] = tw
    return lists, writeback


# ------------------------------------------------------- multi-tensor launches
#
# One launch per group of tensors instead of one per tensor (a GPT-2 list is 148
# tensors: 148 launches cost more than the work). The host writes a table with one row
# per tensor (the addresses of its tensors, its numel, its index in the op's lists, its
# first block); a per-block map says which row each program works on. Kernels turn
# the addresses back into typed pointers (`tensor_ptr`). Both tables are cached by
# content: in a training loop the same tensors come back every step, so the steady
# state copies nothing to the device (and so can be captured in a CUDA graph).

TORCH_TO_TL = {torch.float32: tl.float32, torch.float64: tl.float64,
               torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
COL_NUMEL, COL_INDEX, COL_FIRST = 0, 1, 2  # then one column per list
_TABLE_CACHE: dict = {}
_TABLE_CACHE_SIZE = 16


@triton.jit
def table_start(table_ptr, map_ptr, NCOL: tl.constexpr, CHUNK: tl.constexpr):
    """This program's (row pointer, numel, tensor index, first element) when each
    program works on CHUNK elements of its tensor."""
    pid = tl.program_id(0)
    rec = table_ptr + tl.load(map_ptr + pid).to(tl.int64) * NCOL
    n = tl.load(rec + 0)  # COL_NUMEL
    index = tl.load(rec + 1)  # COL_INDEX
    start = (pid - tl.load(rec + 2)).to(tl.int64) * CHUNK  # COL_FIRST
    return rec, n, index, start


@triton.jit
def table_row(table_ptr, map_ptr, NCOL: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (row pointer, numel, tensor index, element offsets): one BLOCK."""
    rec, n, index, start = table_start(table_ptr, map_ptr, NCOL, BLOCK)
    return rec, n, index, start + tl.arange(0, BLOCK)


@triton.jit
def tensor_ptr(rec, k, DTYPE: tl.constexpr, ALIGNED: tl.constexpr = False):
    """The k-th list's tensor of this row, as a pointer to DTYPE; 16-byte aligned
    under ALIGNED (see `vector_ready`)."""
    ptr = tl.load(rec + 3 + k).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def block_mask(offs, n, ALIGNED: tl.constexpr = False):
    """offs < n; under ALIGNED, n is a multiple of 8 (or 0) and offs starts at one, so
    the mask is uniform over each 8 elements: the hint that, with 16-byte aligned
    pointers, lets Triton load and store 16-byte vectors."""
    mask = offs < n
    if ALIGNED:
        mask = tl.max_constancy(mask, 8)
    return mask


def _cached(key, build):
    hit = _TABLE_CACHE.pop(key, None)
    if hit is None:
        hit = build()
        while len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
            _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
    _TABLE_CACHE[key] = hit  # most recently used last
    return hit


def multi_tensor_groups(lists, key_of, block, device, split_aligned=False, key_lists=None):
    """Group the params (lists[0]) that have elements by key_of(i) (by
    (key_of(i), `vector_ready`) under split_aligned), and build each group's tables for
    `tensor_ptr`: list k of a row is lists[k][i], or the param where lists[k] is empty
    (a stand-in the kernel's flags never read). Returns
    [(key, indices, table, block_map, num_blocks)]. With `key_lists` instead of key_of,
    the key is the tuple of the dtypes of those lists' tensors, and under split_aligned
    the C++ twin (`_C.triton_tables`) does the work where the library loaded."""
    if key_lists is not None:
        native = _native_tables() if split_aligned else None
        res = None if native is None else native(lists, tuple(key_lists),
                                                 [0] * len(lists[0]), block)
        if res is not None:
            ncol = 3 + len(lists)

            def indices(rows):  # the tensor index column of a table's rows
                return torch.frombuffer(bytearray(rows), dtype=torch.int64)[COL_INDEX::ncol]

            return [((dtypes, aligned), indices(g[2]).tolist(), table, bmap, programs)
                    for g, (dtypes, _, aligned, table, bmap, programs)
                    in zip(res[1], _upload(res[1], block, device))]

        def key_of(i):
            return tuple((lists[k] or lists[0])[i].dtype for k in key_lists)

    groups: dict = {}
    rows_of = {}  # one pass over the addresses, for both the keys and the tables
    params = lists[0]
    full = [lst if lst else params for lst in lists]  # an empty list: the param stands in
    for i, p in enumerate(params):
        n = p.numel()
        if n:
            ptrs = [lst[i].data_ptr() for lst in full]
            rows_of[i] = (n, ptrs)
            key = key_of(i)
            if split_aligned:  # vector_ready's common case inline: all aligned
                aligned = n % 8 == 0 and (all(ptr % 16 == 0 for ptr in ptrs)
                                          or vector_ready(lists, i, ptrs))
                key = (key, aligned)
            groups.setdefault(key, []).append(i)
    out = []
    for key, idx in groups.items():
        rows, counts, first = [], [], 0
        for i in idx:
            n, ptrs = rows_of[i]
            rows.append([n, i, first] + ptrs)
            counts.append(-(-n // block))  # cdiv; triton.cdiv is a slow jit call
            first += counts[-1]
        flat = tuple(v for row in rows for v in row)
        table = _cached(("table", device, flat),
                        lambda: torch.tensor(flat, dtype=torch.int64).to(device))
        counts = tuple(counts)
        block_map = _cached(("map", device, counts), lambda: torch.repeat_interleave(
            torch.arange(len(idx), dtype=torch.int32),
            torch.tensor(counts, dtype=torch.int64)).to(device))
        out.append((key, idx, table, block_map, first))
    return out


def vector_ready(lists, i, ptrs=None) -> bool:
    """Whether tensor i of every list it is element-wise in (numel of the param's) is
    16-byte aligned and its numel a multiple of 8: the kernels' ALIGNED (`tensor_ptr`,
    `block_mask`), under which compiled Triton moves 16-byte vectors instead of single
    elements (a table's addresses are opaque to it otherwise). Views at odd offsets and
    odd sizes take the unhinted kernel. `ptrs`: the row's addresses, if known (an
    empty list's stands in as the param's)."""
    p = lists[0][i]
    n = p.numel()
    if n % 8:
        return False
    if ptrs is None:
        ptrs = [(lst[i] if lst else p).data_ptr() for lst in lists]
    # only a misaligned address needs the numel call (a one-element step is exempt)
    return all(ptr % 16 == 0 or (lst and lst[i].numel() != n)
               for lst, ptr in zip(lists, ptrs))


def launch_multi_tensor(kernel, lists, key_of, consts_of, args, flags, device, key_lists=None):
    """Run a multi-tensor kernel of one BLOCK per program over `lists` (params first):
    one launch per group of params with the same key_of(i) and `vector_ready`, as
    kernel[(blocks,)](table, block_map, *args, **flags, **consts_of(key), ALIGNED, NCOL,
    BLOCK), on the params' device. The kernel starts with `table_row`, reads its tensors
    with `tensor_ptr` (list k of `lists` is column k) and masks with `block_mask`.
    (Adafactor's 0-/1-D tensors; the element-wise steps go through `elementwise_step`.)
    `key_lists`: as multi_tensor_groups' (the tables then built in C++)."""
    block = block_size()
    groups = multi_tensor_groups(lists, key_of, block, device, split_aligned=True,
                                 key_lists=key_lists)
    # Triton launches on the current CUDA device: make it the params' one.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for (key, aligned), _, table, block_map, num_blocks in groups:
            kernel[(num_blocks,)](table, block_map, *args, **flags, **consts_of(key),
                                  ALIGNED=aligned, NCOL=3 + len(lists), BLOCK=block,
                                  num_warps=4 if block > 4096 else 8, **LAUNCH_OPTIONS)


# The dtypes a group key's codes stand for (csrc/python_lists.cpp dtype_code).
CODE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _native_tables():
    """`_C.triton_tables` (csrc/python_lists.cpp), or None: the C++ library did not
    load, or DLOPT_TRITON_PY_TABLES=1 asks for the Python twin (tests, A/B)."""
    if os.environ.get("DLOPT_TRITON_PY_TABLES", "0") not in ("", "0"):
        return None
    return _lib.c_function("triton_tables")


def _upload(groups, chunk, device):
    """_C.triton_tables' groups with their tables on `device` (cached by content)."""
    out = []
    for key, aligned, rows, bmap, programs in groups:
        # one entry for both (the rows and the chunk size fix the map): hashing the
        # rows, ~10 KB for the GPT-2 list, is most of a cache lookup
        table, block_map = _cached(("tables", device, chunk, rows), lambda: (
            torch.frombuffer(bytearray(rows), dtype=torch.int64).to(device),
            torch.frombuffer(bytearray(bmap), dtype=torch.int32).to(device)))
        out.append((tuple(CODE_DTYPES[c] for c in key[:-1]), key[-1], aligned, table,
                    block_map, programs))
    return out


def elementwise_groups(lists, mutated, key_lists, extra, chunk, device, elementwise=None):
    """The launch groups of an element-wise step over `lists` (params first, an empty
    list standing in as the params; mutated[k]: the kernel writes list k; the lists
    from index `elementwise` on hold one-element tensors, the step counts): scratch
    copies for tensors not laid out like their param (`align_to_params`), then one
    group per (dtypes of the lists in key_lists, extra[i], `vector_ready`) with its
    tables for `table_start` at `chunk` elements a program. Returns (groups,
    writeback, lists): groups [(dtypes, extra, aligned, table, block_map, programs)];
    writeback as align_to_params'; the lists the tables point into, scratch copies
    included, which must outlive the launches. In C++ where the library loaded (the
    walk over every tensor is most of a step's host time), else multi_tensor_groups."""
    native = _native_tables()
    codes = list(extra) if extra is not None else [0] * len(lists[0])
    ne = len(lists) if elementwise is None else elementwise

    def align():
        done, writeback = align_to_params(lists[:ne], mutated[:ne])
        return done + list(lists[ne:]), writeback

    if native is not None:
        res = native(lists, key_lists, codes, chunk)
        if res is not None:
            contiguous, groups = res
            if contiguous:
                return _upload(groups, chunk, device), [], lists
            aligned, writeback = align()
            res = native(aligned, key_lists, codes, chunk)
            if res is not None:
                return _upload(res[1], chunk, device), writeback, aligned
    aligned, writeback = align()

    def key_of(i):
        return tuple((aligned[k] or aligned[0])[i].dtype for k in key_lists), codes[i]

    groups = multi_tensor_groups(aligned, key_of, chunk, device, split_aligned=True)
    return [(key[0], key[1], al, table, bmap, programs)
            for (key, al), _, table, bmap, programs in groups], writeback, aligned


def elementwise_step(kernel, lists, mutated, state_steps, *, lr, grad_scale, found_inf,
                     sr_seed, floats, flags, steps_in_table=False, extra_key=None):
    """The host half every element-wise Triton step shares. `lists` is [params, grads,
    *states, master_params] (a state list the step does not use is empty; the first one
    that is not gives S_DT), `mutated` says which the kernel writes. In order: lr,
    grad_scale, found_inf and sr_seed onto the params' device; the steps as the kernels
    read them (`count_steps`: the count before this step, `next_step` in the kernel;
    with `steps_in_table` they are the table's last column, typed STEP_DT); the
    groups and their tables (`elementwise_groups`, with scratch copies where a tensor is
    not laid out like its param); one launch per group, as
    kernel[(programs,)](table, block_map, lr, grad_scale, found_inf, sr_seed, *floats,
    **flags, HAS_GS, HAS_FI, MASTER, SR, P_DT, S_DT[, STEP_DT], **extra_key(i),
    ALIGNED, NCOL, BLOCK, ITERS, num_warps) where each program owns BLOCK * ITERS
    elements of one tensor (`table_start`, `launch_sizes`); then the copies written
    back and the versions bumped (writes through raw pointers bypass autograd's
    counters, as in the C++ kernels). `extra_key(i)`: constexprs for params that need
    another specialization."""
    params, masters = lists[0], lists[-1]
    dev = params[0].device
    lr, grad_scale, found_inf, sr_seed = (on_device(t, dev)
                                          for t in (lr, grad_scale, found_inf, sr_seed))
    if state_steps:
        steps, finish_steps = count_steps(state_steps, found_inf, dev)
    else:
        steps, finish_steps = [], (lambda: None)
    table_lists = [*lists, steps] if steps_in_table else list(lists)
    s_index = next((k for k in range(2, len(lists) - 1) if lists[k]), 0)  # S_DT's list
    key_lists = (0, s_index, len(lists)) if steps_in_table else (0, s_index)
    extras, codes = [], None
    if extra_key is not None:  # distinct constexpr dicts, by code
        codes = []
        for i in range(len(params)):
            d = tuple(sorted(extra_key(i).items()))
            if d not in extras:
                extras.append(d)
            codes.append(extras.index(d))
    block, iters, warps = launch_sizes()
    # `_keep`: scratch copies the tables point into, alive until the launches are queued
    groups, writeback, _keep = elementwise_groups(
        table_lists, tuple(mutated) + (False,) * steps_in_table, key_lists, codes,
        block * iters, dev, elementwise=len(lists))
    sr = sr_seed is not None and not masters
    flags = dict(flags, HAS_GS=grad_scale is not None, HAS_FI=found_inf is not None,
                 MASTER=bool(masters))
    # Absent optional tensors get a stand-in pointer that the constexpr flags never read.
    gs, fi, seed = (lr if t is None else t for t in (grad_scale, found_inf, sr_seed))
    # Triton launches on the current CUDA device: make it the params' one.
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        for dtypes, code, aligned, table, block_map, programs in groups:
            # CT: the arithmetic's type, fp64 for float64 params (fp32 otherwise)
            consts = dict(SR=sr and dtypes[0] == torch.bfloat16, P_DT=TORCH_TO_TL[dtypes[0]],
                          S_DT=TORCH_TO_TL[dtypes[1]],
                          CT=tl.float64 if dtypes[0] == torch.float64 else tl.float32,
                          **dict(extras[code] if extras else ()))
            if steps_in_table:
                consts["STEP_DT"] = TORCH_TO_TL[dtypes[2]]
            kernel[(programs,)](table, block_map, lr, gs, fi, seed, *floats, **flags,
                                **consts, ALIGNED=aligned, NCOL=3 + len(table_lists),
                                BLOCK=block, ITERS=iters, num_warps=warps, **LAUNCH_OPTIONS)
    for dst, src in writeback:
        dst.copy_(src)
    finish_steps()
    torch.autograd.graph.increment_version(
        [t for lst, m in zip(lists, mutated) if m for t in lst])


def slot_ranges(groups, numels, block, device):
    """For kernels that write one slot per program of `multi_tensor_groups`' launches
    (LAMB's and the norm's partial sums), with every group's slots side by side: each
    group's first slot, the slot count, tensor i's slots [ranges[2i], ranges[2i + 1])
    as a device tensor (empty for a tensor without elements; cached by content), and
    the widest range."""
    ranges = [0] * (2 * len(numels))
    offsets, total = [], 0
    for _, idx, _, _, _ in groups:
        offsets.append(total)
        for i in idx:
            ranges[2 * i] = total
            total += -(-numels[i] // block)
            ranges[2 * i + 1] = total
    widest = max((hi - lo for lo, hi in zip(ranges[0::2], ranges[1::2])), default=0)
    ranges_t = _cached(("ranges", device, tuple(ranges)),
                       lambda: torch.tensor(ranges, dtype=torch.int64).to(device))
    return offsets, total, ranges_t, widest
