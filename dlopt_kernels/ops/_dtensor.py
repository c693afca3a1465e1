"""DTensor rules for the `dlopt` ops: what lets the optimizers and `clip_grad_norm_`
step the sharded params of FSDP2 (`fully_shard`) and tensor parallelism.

DTensor runs an op through sharding propagation, which knows no strategy for a custom
op ("does not have a sharding strategy registered"). Each op gets a rule instead
(`torch.library.register_torch_dispatch`), which runs the op on plain tensors:

- Element-wise steps (Adam, SGD, Adagrad, RMSprop, Lion): a param's update reads only
  its own elements, so each rank runs the op on its local shards: the same kernels, no
  communication. A grad placed unlike its param (Partial after a tensor-parallel
  backward, Replicate) is redistributed to the param's placements first; a state must
  be placed as its param (it is when the optimizer made it: `zeros_like(param)`).
- `multi_tensor_norm`: the norms of the local shards, combined across the mesh dims
  each tensor is sharded on (one all-reduce per mesh dim); the results are Replicate
  DTensors, as torch's norm of DTensors.
- LAMB: the trust ratio ||p|| / ||u|| needs whole-tensor norms. With every param a
  DTensor on one mesh (FSDP2), each rank runs the pure-torch reference kernel on its
  shards, and the sums of squares behind the ratios are all-reduced between its two
  passes: two numbers per tensor cross the network, not the tensors.
- Adafactor (row and column means, RMS), and LAMB otherwise: a param sharded on some
  mesh dim is gathered with its grad and states (`full_tensor`), stepped whole on every
  rank, and each rank keeps its shard of the result: correct, for an all-gather of
  each of those tensors per step. Replicated params run locally.

Stochastic rounding: ranks that hold the same elements must round them alike, so the
seed is broadcast along the mesh dims where params are replicated; shards of one tensor
get distinct random streams (the seed is offset by the shard's coordinate).

The rules are registered once `torch.distributed.tensor` has been imported
(`register_if_loaded`: at import of dlopt_kernels, at optimizer construction, in
`clip_grad_norm_`), so plain single-device use never pays for importing it.
"""
from __future__ import annotations

import functools
import math
import sys

import torch
import torch.distributed as dist

from dlopt_kernels.ops._library import run_kernel

_REGISTERED = False
_DTENSOR: type = type(None)  # torch.distributed.tensor.DTensor, once registered
ELEMENTWISE = ("adam_step", "sgd_step", "adagrad_step", "rmsprop_step", "lion_step")
WHOLE = ("lamb_step", "adafactor_step")
# Adafactor's state lists with one entry per param of >= 2 dims (True) or of 0-1 dims
# (False), in param order; every other list has one entry per param.
_FACTORED = {"row_vars": True, "col_vars": True, "variances": False}
_GOLDEN = 0x9E3779B9  # rounding.h sr_tensor_key's multiplier


def register_if_loaded() -> None:
    """Register the rules, if torch.distributed.tensor is imported (once)."""
    global _REGISTERED, _DTENSOR
    if _REGISTERED or "torch.distributed.tensor" not in sys.modules or not dist.is_available():
        return
    from torch.distributed.tensor import DTensor
    _DTENSOR = DTensor

    from dlopt_kernels.ops._library import LIB
    for name in ELEMENTWISE:
        torch.library.register_torch_dispatch(f"dlopt::{name}", DTensor, _elementwise, lib=LIB)
    for name in WHOLE:
        torch.library.register_torch_dispatch(f"dlopt::{name}", DTensor, _whole, lib=LIB)
    torch.library.register_torch_dispatch("dlopt::multi_tensor_norm", DTensor, _norm, lib=LIB)
    _REGISTERED = True


def register_dtensor_rules() -> None:
    """Make the `torch.ops.dlopt.*` ops accept DTensors (FSDP2, tensor parallel) now.

    Imports torch.distributed.tensor and registers the rules. The optimizers and
    `clip_grad_norm_` do this themselves when torch.distributed.tensor is loaded; call it
    before using the ops directly on DTensors if dlopt_kernels was imported first.
    """
    if not dist.is_available():
        raise RuntimeError("register_dtensor_rules: this build of torch has no "
                           "torch.distributed")
    import torch.distributed.tensor  # noqa: F401
    register_if_loaded()


# ------------------------------------------------------------------------- helpers


def _is_dt(t) -> bool:
    return isinstance(t, _DTENSOR)  # the rules run only once _DTENSOR is set


def _bind(func, args, kwargs) -> dict:
    """The op's arguments by name, defaults filled in (schema order)."""
    out = {}
    for k, a in enumerate(func._schema.arguments):
        if k < len(args):
            out[a.name] = args[k]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value
    return out


@functools.lru_cache(maxsize=None)
def _tensor_lists(func) -> tuple[tuple[str, bool], ...]:
    """(name, mutated) of the op's Tensor[] arguments (read once per op: every step
    asks)."""
    return tuple((a.name, a.alias_info is not None and a.alias_info.is_write)
                 for a in func._schema.arguments if str(a.type) == "List[Tensor]")


def _scalar(t):
    """A 0-dim tensor argument (lr, grad_scale, found_inf, ...) as a plain tensor."""
    return t.full_tensor() if _is_dt(t) else t


def _checked_params(a) -> list:
    """The op's params, refused if a DTensor among them has a Partial placement."""
    for i, p in enumerate(a["params"]):
        if _is_dt(p) and any(pl.is_partial() for pl in p.placements):
            raise ValueError(f"params[{i}] is a DTensor with a Partial placement "
                             f"{p.placements}: an optimizer step needs the param's values, "
                             "reduce it first")
    return a["params"]


def _sharded(t) -> bool:
    return _is_dt(t) and any(not pl.is_replicate() for pl in t.placements)


def _shared_seed(seed, meshes_and_dims):
    """`seed` (a 0-dim int64 tensor) made equal on the ranks of each (mesh, dim) given:
    broadcast from each dim's first rank, on a copy."""
    seed = seed.clone()
    for mesh, d in meshes_and_dims:
        if mesh.size(d) > 1:
            dist.broadcast(seed, group=mesh.get_group(d), group_src=0)
    return seed


def _index_seed(seed, i):
    """The seed that makes index 0 of a call draw what index i of a larger call draws
    (rounding.h: the key mixes seed ^ index * golden)."""
    return seed ^ ((i * _GOLDEN) & 0xFFFFFFFF)


# ------------------------------------------------------------- element-wise steps


def _local_of(name, i, t, p, mutated):
    """List `name`'s tensor of params[i], as the local tensor the op runs on."""
    if name == "state_steps":
        return _scalar(t)
    if not _is_dt(p):
        if _is_dt(t):
            raise TypeError(f"{name}[{i}] is a DTensor but params[{i}] is a plain tensor")
        return t
    if not _is_dt(t):
        raise TypeError(f"{name}[{i}] is a plain tensor but params[{i}] is a DTensor "
                        f"(placements {p.placements}): its state must be a DTensor placed "
                        "as the param")
    if t.device_mesh != p.device_mesh or t.shape != p.shape:
        raise ValueError(f"{name}[{i}] must be a DTensor of params[{i}]'s shape "
                         f"{tuple(p.shape)} on its device mesh, got shape {tuple(t.shape)} "
                         f"on {t.device_mesh}")
    if t.placements != p.placements:
        if mutated:
            raise ValueError(f"{name}[{i}] is placed {t.placements} but params[{i}] is placed "
                             f"{p.placements}: a state must be placed as its param")
        t = t.redistribute(p.device_mesh, p.placements)
    return t._local_tensor


def _elementwise(mode, func, types, args, kwargs):
    a = _bind(func, args, kwargs)
    params = _checked_params(a)
    local = _localize(func, a)  # every check before any tensor changes
    if local.get("sr_seed") is None or not any(_is_dt(p) for p in params):
        _call(func, local)
        return None
    # one call per (mesh, placements), each with its shards' own random streams
    groups: dict = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device_mesh, p.placements) if _is_dt(p) else None, []).append(i)
    for key, idx in groups.items():
        sub = _subset(local, idx, len(params))
        if key is not None:
            sub["sr_seed"] = _shard_seed(local["sr_seed"], *key)
        _call(func, sub)
    return None


def _call(func, a: dict) -> None:
    """The op on the plain tensors of `a`: in eager mode straight to the kernel it would
    pick (run_kernel, as the optimizers' fast path), else through the op."""
    args = list(a.values())
    params = args[0]
    if params and type(params[0]) in (torch.Tensor, torch.nn.Parameter) and \
            not torch.compiler.is_compiling():
        run_kernel(func.name().split("::", 1)[1], args)
    else:
        func(*args)


def _shard_seed(seed, mesh, placements):
    """Equal along the replicated mesh dims, distinct along the sharded ones."""
    seed = _shared_seed(seed, [(mesh, d) for d, pl in enumerate(placements)
                               if pl.is_replicate()])
    coord, index = mesh.get_coordinate(), 0
    for d, pl in enumerate(placements):
        if pl.is_shard():
            index = index * mesh.size(d) + coord[d]
    return seed + index * 0x632BE5AB


def _subset(a, idx, n):
    """The arguments `a` for params[idx] only: every list with one entry per param."""
    sub = dict(a)
    for name, value in a.items():
        if isinstance(value, (list, tuple)) and len(value) == n:
            sub[name] = [value[i] for i in idx]
    return sub


def _localize(func, a) -> dict:
    """The arguments with every DTensor replaced by the tensor the op runs on here."""
    params = a["params"]
    # the common case first (a tensor of a DTensor param on its mesh, placed alike, of
    # its shape: its local tensor), the checks and messages of _local_of otherwise
    specs = [p._spec if _is_dt(p) else None for p in params]
    local = dict(a)
    for name, mutated in _tensor_lists(func):
        out = []
        for i, t in enumerate(a[name]):
            spec = specs[i] if i < len(specs) and name != "state_steps" else None
            ts = t._spec if spec is not None and _is_dt(t) else None
            if ts is not None and (ts.mesh is spec.mesh and ts.placements == spec.placements
                                   and ts.shape == spec.shape):
                out.append(t._local_tensor)
            else:
                out.append(_local_of(name, i, t, params[i] if i < len(params) else t, mutated))
        local[name] = out
    for name, value in a.items():
        if isinstance(value, torch.Tensor):
            local[name] = _scalar(value)
    return local


# ------------------------------------------------ steps that need whole tensors


def _positions(name, params):
    """For list `name`: each param's position in it (None: the param has no entry)."""
    if name not in _FACTORED:
        return list(range(len(params)))
    out, k = [], 0
    for p in params:
        if (p.dim() >= 2) == _FACTORED[name]:
            out.append(k)
            k += 1
        else:
            out.append(None)
    return out


def _whole(mode, func, types, args, kwargs):
    a = _bind(func, args, kwargs)
    params = _checked_params(a)
    lists = _tensor_lists(func)
    pos = {name: _positions(name, params) for name, _ in lists}

    def tensors_of(i):
        return [a[name][pos[name][i]] for name, _ in lists
                if a[name] and pos[name][i] is not None]

    # (not while torch.compile traces: the reference kernels read values on the host)
    if not torch.compiler.is_compiling() and (
            (func.name() == "dlopt::lamb_step" and _lamb_locally(func, a))
            or (func.name() == "dlopt::adafactor_step" and _adafactor_locally(func, a))):
        return None
    # a param is stepped whole if it or any of its tensors is sharded
    gathered = [i for i in range(len(params)) if any(_sharded(t) for t in tensors_of(i))]
    rest = [i for i in range(len(params)) if i not in set(gathered)]
    seed = a.get("sr_seed")
    if seed is not None:
        meshes = {p.device_mesh for p in params if _is_dt(p)}
        seed = _shared_seed(_scalar(seed),
                            [(m, d) for m in meshes for d in range(m.ndim)])
    for idx in ([rest] if rest else []) + [[i] for i in gathered]:
        sub = dict(a)
        for name, _ in lists:
            sub[name] = [a[name][pos[name][i]] for i in idx
                         if a[name] and pos[name][i] is not None]
        if seed is not None:
            sub["sr_seed"] = _index_seed(seed, idx[0]) if len(idx) == 1 else seed
        _run_gathered(func, sub, lists)
    return None


def _one_mesh(a):
    """(params, mesh, their set of placements) when the op's params are all DTensors on
    one mesh, placed alike under stochastic rounding (each shard then draws its own
    bits): what the shard-local LAMB and Adafactor need. (params, None, None) else."""
    params = a["params"]
    if not params or not all(_is_dt(p) for p in params):
        return params, None, None
    mesh = params[0].device_mesh
    placements = {p.placements for p in params}
    if any(p.device_mesh != mesh for p in params) or (
            a["sr_seed"] is not None and len(placements) > 1):
        return params, None, None
    return params, mesh, placements


def _lamb_locally(func, a) -> bool:
    """LAMB on each rank's shards when every param is a DTensor on one mesh (and, for
    stochastic rounding, placed alike): the element-wise maths locally, the sums of
    squares behind each trust ratio all-reduced (2 numbers per tensor, not the tensors
    themselves). It runs the pure-torch reference kernel, whose two passes leave room
    for the all-reduce between them. False: not applicable, nothing done."""
    from dlopt_kernels.backends.reference.optim_lamb import lamb_step
    params, mesh, placements = _one_mesh(a)
    if mesh is None:
        return False
    local = _localize(func, a)  # checks each state is placed as its param
    if local["sr_seed"] is not None:
        local["sr_seed"] = _shard_seed(local["sr_seed"], mesh, placements.pop())
    shard_dims = [[d for d, pl in enumerate(p.placements) if pl.is_shard()] for p in params]

    def whole_sums(sums):  # (n, 2) -> rows of quantities for _reduce_over_shards
        return _reduce_over_shards(sums.t().contiguous(), dist.ReduceOp.SUM, mesh,
                                   shard_dims).t()

    del local["backend"]
    lamb_step(*local.values(), whole_sums=whole_sums)
    return True


def _adafactor_locally(func, a) -> bool:
    """Adafactor on each rank's shards when every param is a DTensor on one mesh (and,
    for stochastic rounding, placed alike) whose states are laid out as the optimizer
    makes them: row and column variances replicated, a 0-/1-D param's variance placed as
    the param. Each rank updates its block of the param; the sums of g^2 along the rows
    and columns (the replicated variances' update), and the sums of p^2 and u^2 behind
    each step size, are summed over the ranks: R + C + 2 numbers per matrix, not the
    tensors. The pure-torch reference kernel runs, with these sums as its hooks. False:
    not applicable, nothing done."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from dlopt_kernels.backends.checks import check_factored_lists
    from dlopt_kernels.backends.reference.optim_adafactor import LocalBlock, adafactor_step
    params, mesh, placements = _one_mesh(a)
    if mesh is None:
        return False
    factored = [p for p in params if p.dim() >= 2]
    for t in (*a["row_vars"], *a["col_vars"]):  # whole on every rank
        if not _is_dt(t) or t.device_mesh != mesh or any(
                not pl.is_replicate() for pl in t.placements):
            return False
    var_of = [p for p in params if p.dim() < 2]
    if len(a["row_vars"]) != len(factored) or len(a["variances"]) != len(var_of) or any(
            not _is_dt(v) or v.placements != p.placements for v, p in zip(a["variances"], var_of)):
        return False
    check_factored_lists(params, a["grads"], a["row_vars"], a["col_vars"], a["variances"],
                         a["master_params"], a["state_steps"], a["sr_seed"] is not None,
                         wide=True)  # the reference kernel runs: float64 params too
    local = dict(a)
    for name, mutated in _tensor_lists(func):
        if name in ("row_vars", "col_vars"):
            local[name] = [t._local_tensor for t in a[name]]
        elif name == "variances":
            local[name] = [_local_of(name, i, t, p, mutated)
                           for i, (t, p) in enumerate(zip(a[name], var_of))]
        else:
            local[name] = [_local_of(name, i, t, params[i], mutated)
                           for i, t in enumerate(a[name])]
    for name, value in a.items():
        if isinstance(value, torch.Tensor):
            local[name] = _scalar(value)
    if local["sr_seed"] is not None:
        local["sr_seed"] = _shard_seed(local["sr_seed"], mesh, placements.pop())

    def shard_of(p):
        dims = [d for d, pl in enumerate(p.placements) if pl.is_shard() and mesh.size(d) > 1]

        def reduce(t):
            for d in dims:
                dist.all_reduce(t, dist.ReduceOp.SUM, group=mesh.get_group(d))

        _, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
        return LocalBlock(tuple(p.shape), tuple(offset), reduce)

    del local["backend"]
    adafactor_step(*local.values(), shards=[shard_of(p) for p in params])
    return True


def _run_gathered(func, a, lists) -> None:
    """Run the op on whole tensors: gather the sharded ones (every rank then computes
    the same result) and keep each rank's shard of what the op changed; a replicated
    DTensor's local tensor is already whole."""
    full, back = dict(a), []
    for name, mutated in lists:
        out = []
        for t in a[name]:
            if _sharded(t):
                f = t.full_tensor()
                if mutated:
                    back.append((t, f))
                t = f
            elif _is_dt(t):
                t = t._local_tensor
            out.append(t)
        full[name] = out
    for name, value in a.items():
        if isinstance(value, torch.Tensor):
            full[name] = _scalar(value)
    func(*full.values())
    from torch.distributed.tensor import distribute_tensor
    for t, f in back:
        # every rank holds the same result: take the local shard without communication
        shard = distribute_tensor(f, t.device_mesh, t.placements, src_data_rank=None)
        t._local_tensor.copy_(shard._local_tensor)


# ----------------------------------------------------------------------- norms


def _norm(mode, func, types, args, kwargs):
    from torch.distributed.tensor import DTensor, Replicate
    a = _bind(func, args, kwargs)
    tensors, ord_ = a["tensors"], float(a["norm_type"])
    if not all(_is_dt(t) for t in tensors):
        raise TypeError("tensors: mixes DTensors and plain tensors; pass one kind")
    meshes = {t.device_mesh for t in tensors}
    if len(meshes) > 1:
        raise ValueError("tensors: DTensors on more than one device mesh; take the norm "
                         "per mesh")
    mesh = meshes.pop()
    local = []
    for t in tensors:
        if any(pl.is_partial() for pl in t.placements):  # the norm of a sum needs the sum
            t = t.redistribute(mesh, [Replicate() if pl.is_partial() else pl
                                      for pl in t.placements])
        local.append(t)
    norms, _ = func([t._local_tensor for t in local], a["norm_type"], a["backend"])
    norms = _combine(norms.double(), ord_, mesh,
                     [[d for d, pl in enumerate(t.placements) if pl.is_shard()] for t in local])
    total = torch.linalg.vector_norm(norms, ord_) if norms.numel() else norms.new_zeros(())
    rep = [Replicate()] * mesh.ndim
    return (DTensor.from_local(norms.float(), mesh, rep, run_check=False),
            DTensor.from_local(total.float(), mesh, rep, run_check=False))


def _combine(norms, ord_, mesh, shard_dims):
    """Per-tensor norms of local shards -> norms of the whole tensors: sums of |x|^p
    (counts for ord 0) add up across shards, max |x| and min |x| take the max / min."""
    if not any(shard_dims):
        return norms
    if math.isinf(ord_):
        sign = 1.0 if ord_ > 0 else -1.0
        # all_reduce MAX drops NaN: carry a NaN flag beside the values (both by MAX)
        vals = torch.stack([torch.where(norms.isnan(), -math.inf, sign * norms),
                            norms.isnan().double()])
        op = dist.ReduceOp.MAX
    else:
        vals = (norms if ord_ == 0 else norms ** ord_).unsqueeze(0)
        op = dist.ReduceOp.SUM
    vals = _reduce_over_shards(vals, op, mesh, shard_dims)
    if math.isinf(ord_):
        return torch.where(vals[1] > 0, math.nan, sign * vals[0])
    return vals[0] if ord_ == 0 else vals[0] ** (1.0 / ord_)


def _reduce_over_shards(vals, op, mesh, shard_dims):
    """Column i of `vals` (one row per quantity) reduced by `op` over the ranks that
    hold the shards of tensor i: one all-reduce per mesh dim, over the columns of the
    tensors sharded along it."""
    for d in range(mesh.ndim):
        idx = [i for i, dims in enumerate(shard_dims) if d in dims]
        if idx and mesh.size(d) > 1:
            buf = vals[:, idx].contiguous()
            dist.all_reduce(buf, op, group=mesh.get_group(d))
            vals[:, idx] = buf
    return vals
