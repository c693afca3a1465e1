"""The ranks of tests/optim/test_dtensor.py: 4 CPU processes in a gloo group run every
case below on DTensor params and compare with a plain one-process run of the same
optimizer on the whole tensors (every rank builds the same whole tensors from one seed),
or with torch.optim in the same distributed setup (fully_shard, DDP + ZeRO-1).
Each rank writes {case: None or its traceback} to a JSON file. Not a test module."""
from __future__ import annotations

import datetime
import json
import math
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn

WORLD = 4
# uneven shards over 4 ranks (7 and 13 rows, 1 row: three empty shards), a zero-size
# param, a 3-D one, a 0-dim one (always replicated) and one of 4097 elements
SHAPES = [(7, 5), (13,), (3, 4, 6), (1,), (0, 3), (), (4097,)]
CASES: dict = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# ------------------------------------------------------------------ layouts


def layouts():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    mesh1 = init_device_mesh("cpu", (WORLD,))
    mesh2 = init_device_mesh("cpu", (2, 2))

    def fsdp(shape):  # FSDP2: dim 0 sharded over every rank
        return mesh1, [Shard(0)] if len(shape) else [Replicate()]

    def hsdp(shape):  # HSDP: replicated across the first mesh dim, sharded across the second
        return mesh2, [Replicate(), Shard(0) if len(shape) else Replicate()]

    def two_d(shape):  # sharded on two tensor dims (FSDP x TP style)
        if len(shape) >= 2:
            return mesh2, [Shard(0), Shard(1)]
        return mesh2, [Shard(0) if len(shape) else Replicate(), Replicate()]

    return {"fsdp": fsdp, "hsdp": hsdp, "2d": two_d}


def make(shapes, layout, dtype=torch.float32, seed=0):
    """(plain params, DTensor params) with the same values."""
    from torch.distributed.tensor import distribute_tensor
    gen = torch.Generator().manual_seed(seed)
    plain, dts = [], []
    for s in shapes:
        full = torch.randn(s, generator=gen).to(dtype)
        mesh, placements = layout(s)
        plain.append(nn.Parameter(full.clone()))
        dts.append(nn.Parameter(distribute_tensor(full.clone(), mesh, placements)))
    return plain, dts


def set_grads(plain, dts, layout, seed):
    from torch.distributed.tensor import distribute_tensor
    gen = torch.Generator().manual_seed(seed)
    for p, d in zip(plain, dts):
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        p.grad = g.clone()
        mesh, placements = layout(tuple(p.shape))
        d.grad = distribute_tensor(g.to(d.dtype), mesh, placements)  # a copy


def assert_same(got, want, what, exact, rtol=1e-5, atol=1e-6, errors=None):
    """`got` (a DTensor: gathered) against `want`. With `errors`, a mismatch is appended
    there instead of raised: a rank must not stop halfway through the gathers the
    other ranks are still making."""
    got = got.full_tensor() if hasattr(got, "full_tensor") else got
    try:
        assert got.shape == want.shape, (what, got.shape, want.shape)
        if exact:
            assert torch.equal(got, want), (what, (got.double() - want.double()).abs().max())
        else:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    except AssertionError as e:
        if errors is None:
            raise
        diff = ((got.double() - want.double()).abs().max().item()
                if got.shape == want.shape and got.numel() else "-")
        errors.append(f"{what} (max |diff| {diff}): {str(e)[:200]}")


def raise_errors(errors):
    if errors:
        raise AssertionError(f"{len(errors)} mismatches, first: " + "; ".join(errors[:3]))


# ------------------------------------------------------------ optimizer cases

CONFIGS = {
    "Adam": ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    "AdamW": ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    "AdamW_reference": ("AdamW", dict(lr=1e-2, backend="reference")),
    "SGD": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "Adagrad": ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1)),
    "RMSprop": ("RMSprop", dict(lr=1e-2, centered=True, momentum=0.5, weight_decay=0.1)),
    "Lion": ("Lion", dict(lr=1e-3, weight_decay=0.1)),
    "LAMB": ("LAMB", dict(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)),
    "Adafactor": ("Adafactor", dict(lr=1e-2, weight_decay=0.1)),
}


def _twin_run(name, layout_name, steps=3):
    import dlopt_kernels.optim as O
    cls, kwargs = CONFIGS[name]
    layout = layouts()[layout_name]
    plain, dts = make(SHAPES, layout)
    opt_p = getattr(O, cls)(plain, **kwargs)
    opt_d = getattr(O, cls)(dts, **kwargs)
    for step in range(steps):
        set_grads(plain, dts, layout, seed=100 + step)
        opt_p.step()
        opt_d.step()
    # element-wise steps run the same kernel per element: the same bits; LAMB's global
    # grad norm and Adafactor's row / column sums add shards' sums in another order (a
    # rounding apart)
    exact = cls not in ("LAMB", "Adafactor")
    errors = []
    for i, (p, d) in enumerate(zip(plain, dts)):
        assert_same(d, p, f"params[{i}]", exact, errors=errors)
        for key, v in opt_p.state.get(p, {}).items():
            assert_same(opt_d.state[d][key], v, f"state[{i}][{key}]", exact, errors=errors)
    raise_errors(errors)


for _name in CONFIGS:
    for _layout in ("fsdp", "hsdp", "2d"):
        def _case(name=_name, layout=_layout):
            _twin_run(name, layout)
        _case.__name__ = f"step_{_name}_{_layout}"
        case(_case)


@case
def sr_bf16_replicas_agree():
    """bf16 params with stochastic rounding, ranks seeded apart: replicas along HSDP's
    replicated mesh dim stay bit-identical, and the result tracks an fp32 run."""
    import dlopt_kernels.optim as O
    from tolerances import spacing
    # LAMB twice: on shards (params placed alike) and gathered (the 0-dim param's
    # placements differ, which rounds with per-shard seeds cannot serve)
    for cls, shapes in (("AdamW", SHAPES), ("LAMB", SHAPES), ("LAMB", SHAPES[:-2] + SHAPES[-1:]),
                        ("Adafactor", SHAPES)):
        layout = layouts()["hsdp"]
        plain, dts = make(shapes, layout, dtype=torch.float32)
        dts = [nn.Parameter(d.detach().to(torch.bfloat16)) for d in dts]
        # Adafactor's default eps1 is the param dtype's epsilon: give both runs fp32's
        kw = dict(eps=(torch.finfo(torch.float32).eps, 1e-3)) if cls == "Adafactor" else {}
        opt_p = getattr(O, cls)(plain, lr=1e-2, **kw)
        opt_d = getattr(O, cls)(dts, lr=1e-2, stochastic_rounding=True, **kw)
        torch.manual_seed(1234 + dist.get_rank())  # each rank would draw its own seed
        for step in range(3):
            set_grads(plain, dts, layout, seed=200 + step)
            opt_p.step()
            opt_d.step()
        errors = []
        for i, (p, d) in enumerate(zip(plain, dts)):
            local = d._local_tensor.contiguous()
            group = d.device_mesh.get_group(0)  # the replicated dim
            copies = [torch.empty_like(local) for _ in range(d.device_mesh.size(0))]
            dist.all_gather(copies, local, group=group)
            if not all(torch.equal(c, local) for c in copies):
                errors.append(f"{cls} params[{i}]: replicas differ")
            # each step's rounding is off by under an ulp, the start by half of one
            want = p.detach()
            # (at the largest magnitude the value passed: 3 steps of at most ~lr)
            bound = 3.5 * spacing(torch.bfloat16, want.abs() + 0.05) + 1e-6
            got = d.float().full_tensor()
            err = (got.double() - want.double()).abs() / bound
            if got.numel() and float(err.max()) > 1:
                k = int(err.argmax())
                errors.append(f"{cls} params[{i}]: {float(err.max()):.2f} x the bound at "
                              f"{want.flatten()[k].item()} (got {got.flatten()[k].item()})")
        raise_errors(errors)


@case
def fsdp2_training_matches_torch():
    """fully_shard an MLP; ours and torch.optim.AdamW train it side by side, with
    clip_grad_norm_ (ours vs torch's) every step."""
    import copy

    from torch.distributed.fsdp import fully_shard

    import dlopt_kernels.optim as O
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 11), nn.Tanh(), nn.Linear(11, 3))
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    for m in (ours, ref):
        fully_shard(m[0], mesh=mesh)
        fully_shard(m, mesh=mesh)
    opt_o = O.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    opt_r = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(10 + dist.get_rank())  # each rank its own batch
    errors = []
    for _ in range(5):
        x = torch.randn(8, 6, generator=gen)
        for m, opt, clip in ((ours, opt_o, O.clip_grad_norm_),
                             (ref, opt_r, torch.nn.utils.clip_grad_norm_)):
            opt.zero_grad()
            m(x).square().mean().backward()
            norm = clip(m.parameters(), 0.05)
            opt.step()
            if m is ours:
                n_o = norm
            else:
                n_r = norm
        if type(n_o) is not type(n_r) or n_o.placements != n_r.placements:
            errors.append(f"norm {n_o} but torch's {n_r}")
        assert_same(n_o, n_r.full_tensor(), "norm", False, rtol=2e-6, atol=0, errors=errors)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert_same(a, b.full_tensor(), name, False, errors=errors)
    raise_errors(errors)


@case
def fsdp2_grad_scaler_matches_torch():
    """torch.amp.GradScaler under fully_shard, with an inf in one step's batch: ours
    (grad_scale / found_inf handed to the fused step) and torch.optim.AdamW (unscaled
    grads) skip the same step, halve the scale alike and end alike."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import dlopt_kernels.optim as O
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 11), nn.Tanh(), nn.Linear(11, 3))
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    for m in (ours, ref):
        fully_shard(m, mesh=mesh)
    runs = [(ours, O.AdamW(ours.parameters(), lr=1e-2), torch.amp.GradScaler("cpu", 1024.0)),
            (ref, torch.optim.AdamW(ref.parameters(), lr=1e-2),
             torch.amp.GradScaler("cpu", 1024.0))]
    gen = torch.Generator().manual_seed(10 + dist.get_rank())
    errors = []
    for it in range(4):
        x = torch.randn(8, 6, generator=gen)
        if it == 2:
            x[0, 0] = math.inf
        for m, opt, scaler in runs:
            opt.zero_grad()
            scaler.scale(m(x).square().mean()).backward()
            scaler.step(opt)
            scaler.update()
        if runs[0][2].get_scale() != runs[1][2].get_scale():
            errors.append(f"step {it}: scale {runs[0][2].get_scale()} vs "
                          f"{runs[1][2].get_scale()}")
    if runs[0][2].get_scale() != 512.0:
        errors.append(f"the inf step did not halve the scale: {runs[0][2].get_scale()}")
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert_same(a, b.full_tensor(), name, False, errors=errors)
    raise_errors(errors)


@case
def ddp_zero_redundancy_matches_torch():
    """Plain-tensor stacks too: DDP with torch's ZeroRedundancyOptimizer (ZeRO-1), ours
    as its optimizer_class against torch.optim.AdamW; its consolidated state dict has
    torch's keys."""
    import copy

    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dlopt_kernels.optim as O
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 11), nn.Tanh(), nn.Linear(11, 3))
    ours, ref = DDP(copy.deepcopy(base)), DDP(copy.deepcopy(base))
    runs = [(ours, ZeroRedundancyOptimizer(ours.parameters(), optimizer_class=O.AdamW,
                                           lr=1e-2, weight_decay=0.1)),
            (ref, ZeroRedundancyOptimizer(ref.parameters(), optimizer_class=torch.optim.AdamW,
                                          lr=1e-2, weight_decay=0.1))]
    gen = torch.Generator().manual_seed(10 + dist.get_rank())
    for _ in range(4):
        x = torch.randn(8, 6, generator=gen)
        for m, opt in runs:
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    errors = []
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert_same(a.detach(), b.detach(), name, False, errors=errors)
    runs[0][1].consolidate_state_dict(0)
    if dist.get_rank() == 0:
        keys = sorted(runs[0][1].state_dict()["state"][0])
        if keys != ["exp_avg", "exp_avg_sq", "step"]:
            errors.append(f"state keys {keys}")
    raise_errors(errors)


@case
def fsdp2_lamb_adafactor_train():
    """LAMB and Adafactor (gathered per tensor) under fully_shard match the same
    optimizer on an unsharded copy of the model fed the same global batch."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import dlopt_kernels.optim as O
    mesh = init_device_mesh("cpu", (WORLD,))
    for cls in ("LAMB", "Adafactor"):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 2))
        sharded, whole = copy.deepcopy(base), copy.deepcopy(base)
        fully_shard(sharded, mesh=mesh)
        opt_s = getattr(O, cls)(sharded.parameters(), lr=1e-2)
        opt_w = getattr(O, cls)(whole.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(5)
        for _ in range(4):
            x = torch.randn(WORLD, 4, 6, generator=gen)  # the global batch, split by rank
            opt_s.zero_grad()
            opt_w.zero_grad()
            sharded(x[dist.get_rank()]).square().mean().backward()  # FSDP averages grads
            whole(x).square().mean().backward()
            opt_s.step()
            opt_w.step()
        errors = []
        for (name, a), b in zip(sharded.named_parameters(), whole.parameters()):
            assert_same(a, b.detach(), f"{cls} {name}", False, errors=errors)
        raise_errors(errors)


@case
def norms_all_ords():
    """clip_grad_norm_ over DTensor grads vs torch's on the whole grads."""
    import dlopt_kernels.optim as O
    from tolerances import NORM_TOL, NORM_TOL_P
    for layout_name, layout in layouts().items():
        for ord_ in (2.0, 1.0, math.inf, -math.inf, 0.0, 3.5):
            plain, dts = make(SHAPES, layout, seed=7)
            set_grads(plain, dts, layout, seed=8)
            # torch refuses the inf norms of an empty tensor; ours skips it (documented)
            nonempty = [p for p in plain if p.numel() or not math.isinf(ord_)]
            want = torch.nn.utils.clip_grad_norm_(nonempty, 0.5, ord_)
            got = O.clip_grad_norm_(dts, 0.5, ord_)
            t = NORM_TOL if ord_ != 3.5 else NORM_TOL_P
            where = f"{layout_name} ord {ord_}"
            errors = [] if all(pl.is_replicate() for pl in got.placements) else [
                f"{where}: placements {got.placements}"]
            assert_same(got, want, where, False, errors=errors, **t)
            for i, (p, d) in enumerate(zip(plain, dts)):
                assert_same(d.grad, p.grad, f"{where} grads[{i}]", False, rtol=1e-5, atol=1e-7,
                            errors=errors)
            raise_errors(errors)


@case
def norm_nan_or_inf_in_one_shard():
    """A NaN on one rank's shard reaches every rank's norm (2, inf, -inf); an inf gives
    inf for 2 and inf (not the largest float)."""
    import dlopt_kernels.optim as O
    layout = layouts()["fsdp"]
    errors = []
    for bad, ord_, want in ((math.nan, 2.0, math.nan), (math.nan, math.inf, math.nan),
                            (math.nan, -math.inf, math.nan), (math.inf, 2.0, math.inf),
                            (math.inf, math.inf, math.inf), (-math.inf, math.inf, math.inf)):
        plain, dts = make([(8, 3)], layout, seed=9)
        set_grads(plain, dts, layout, seed=10)
        if dist.get_rank() == 3:
            dts[0].grad._local_tensor[0, 0] = bad
        got = float(O.get_total_norm([d.grad for d in dts], ord_).full_tensor())
        if not (math.isnan(got) if math.isnan(want) else got == want):
            errors.append(f"{bad} with ord {ord_}: {got}, want {want}")
    raise_errors(errors)


@case
def lamb_steps_shards_without_gathering():
    """FSDP2's LAMB: every param a DTensor on one mesh, so the step runs on the shards
    (no tensor is gathered) and matches the one-process step; with stochastic rounding
    too."""
    import dlopt_kernels.optim as O
    from dlopt_kernels.ops import _dtensor
    layout = layouts()["fsdp"]
    shapes = [s for s in SHAPES if s]  # the 0-dim param would be replicated
    gathered = []
    real = _dtensor._run_gathered
    _dtensor._run_gathered = lambda *args: gathered.append(args) or real(*args)
    errors = []
    try:
        for kw in (dict(max_grad_norm=1.0, weight_decay=0.1), dict(bias_correction=False)):
            plain, dts = make(shapes, layout, seed=21)
            opt_p, opt_d = O.LAMB(plain, lr=1e-2, **kw), O.LAMB(dts, lr=1e-2, **kw)
            for step in range(3):
                set_grads(plain, dts, layout, seed=22 + step)
                opt_p.step()
                opt_d.step()
            for i, (p, d) in enumerate(zip(plain, dts)):
                assert_same(d, p, f"{kw} params[{i}]", False, errors=errors)
    finally:
        _dtensor._run_gathered = real
    if gathered:
        errors.append(f"{len(gathered)} params gathered")
    raise_errors(errors)


@case
def adafactor_steps_shards_without_gathering():
    """FSDP2's Adafactor (and HSDP's, and rows and columns both sharded): every param a
    DTensor on one mesh, so the step runs on the shards, uneven and empty ones included
    (no tensor is gathered), and matches the one-process step, with weight decay,
    master weights and, placed alike, stochastic rounding (each rank's own bits)."""
    import dlopt_kernels.optim as O
    from dlopt_kernels.ops import _dtensor
    gathered = []
    real = _dtensor._run_gathered
    _dtensor._run_gathered = lambda *args: gathered.append(args) or real(*args)
    errors = []
    shapes = [(7, 5), (13,), (3, 4, 6), (2, 9, 3), (0, 3), (4097,), (1,)]
    try:
        for layout_name in ("fsdp", "hsdp", "2d"):
            layout = layouts()[layout_name]
            for dtype, kw in ((torch.float32, dict(weight_decay=0.1)),
                              (torch.bfloat16, dict(master_weights=True))):
                plain, dts = make(shapes, layout, dtype=dtype, seed=31)
                eps = dict(eps=(torch.finfo(torch.float32).eps, 1e-3))
                opt_p = O.Adafactor(plain, lr=1e-2, **eps, **kw)
                opt_d = O.Adafactor(dts, lr=1e-2, **eps, **kw)
                for step in range(3):
                    set_grads(plain, dts, layout, seed=32 + step)
                    opt_p.step()
                    opt_d.step()
                for i, (p, d) in enumerate(zip(plain, dts)):
                    what = f"{layout_name} {dtype} params[{i}]"
                    assert_same(d, p, what, False, errors=errors)
                    for key, v in opt_p.state[p].items():
                        assert_same(opt_d.state[d][key], v, f"{what} {key}", False,
                                    errors=errors)
        # stochastic rounding on shards: runs locally, and the bf16 params move
        layout = layouts()["fsdp"]
        _, dts = make([(8, 6), (12,)], layout, dtype=torch.bfloat16, seed=33)
        before = [d.full_tensor().clone() for d in dts]
        opt = O.Adafactor(dts, lr=1e-2, stochastic_rounding=True)
        set_grads([torch.zeros(8, 6), torch.zeros(12)], dts, layout, seed=34)
        opt.step()
        if any(torch.equal(d.full_tensor(), b) for d, b in zip(dts, before)):
            errors.append("stochastic rounding: a param did not move")
    finally:
        _dtensor._run_gathered = real
    if gathered:
        errors.append(f"{len(gathered)} params gathered")
    raise_errors(errors)


@case
def grads_placed_unlike_params():
    """Replicate and Partial grads of Shard(0) params are redistributed to the param's
    placements first: the same bits as Shard(0) grads."""
    import dlopt_kernels.optim as O
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
    layout = layouts()["fsdp"]
    mesh = layout((1,))[0]
    errors = []
    for kind in ("replicate", "partial"):
        plain, dts = make([(9, 2), (6,)], layout, seed=13)
        opt_p, opt_d = O.AdamW(plain, lr=1e-2), O.AdamW(dts, lr=1e-2)
        set_grads(plain, dts, layout, seed=14)
        for p, d in zip(plain, dts):
            if kind == "replicate":
                d.grad = distribute_tensor(p.grad.clone(), mesh, [Replicate()])
            else:  # rank 0 holds the grad, the others zeros: the sum is exact
                part = p.grad.clone() if dist.get_rank() == 0 else torch.zeros_like(p.grad)
                d.grad = DTensor.from_local(part, mesh, [Partial()])
        opt_p.step()
        opt_d.step()
        for i, (p, d) in enumerate(zip(plain, dts)):
            assert_same(d, p, f"{kind} params[{i}]", True, errors=errors)
    raise_errors(errors)


@case
def refusals_change_nothing():
    """States placed unlike their param, plain states, states of another shape, Partial
    params: a clear error naming the list, and nothing changed; the norm of DTensors mixed
    with plain tensors or on two meshes: a clear error naming `tensors`."""
    import dlopt_kernels.optim as O
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    layout = layouts()["fsdp"]
    plain, dts = make([(8, 3), (5,)], layout, seed=11)
    opt = O.AdamW(dts, lr=1e-2)
    set_grads(plain, dts, layout, seed=12)
    opt.step()
    before = [d.detach().full_tensor().clone() for d in dts]
    st = opt.state[dts[0]]
    good = st["exp_avg"]
    for bad, err, words in (
            (good.redistribute(good.device_mesh, [Replicate()]), ValueError,
             "exp_avgs[0] is placed"),
            (good.full_tensor(), TypeError, "exp_avgs[0] is a plain tensor")):
        st["exp_avg"] = bad
        try:
            opt.step()
        except err as e:
            assert words in str(e), str(e)
        else:
            raise AssertionError(f"no {err.__name__} for {words}")
        for d, b in zip(dts, before):
            assert torch.equal(d.detach().full_tensor(), b)
    # a state of another shape on the param's mesh, placed alike
    wrong = distribute_tensor(torch.zeros(4, 3), good.device_mesh, good.placements)
    st["exp_avg"] = wrong
    try:
        opt.step()
    except ValueError as e:
        assert "exp_avgs[0]" in str(e) and "shape" in str(e), str(e)
    else:
        raise AssertionError("no ValueError for a state of another shape")
    for d, b in zip(dts, before):
        assert torch.equal(d.detach().full_tensor(), b)
    st["exp_avg"] = good
    # the norm of DTensors mixed with plain tensors, or on two meshes
    from torch.distributed.device_mesh import init_device_mesh
    other_mesh = init_device_mesh("cpu", (2, 2))
    other = distribute_tensor(torch.ones(4), other_mesh, [Shard(0), Replicate()])
    for tensors, err, words in (([dts[0].grad, torch.ones(3)], TypeError, "tensors: mixes"),
                                ([dts[0].grad, other], ValueError, "more than one device mesh")):
        try:
            torch.ops.dlopt.multi_tensor_norm(tensors, 2.0)
        except err as e:
            assert words in str(e), str(e)
        else:
            raise AssertionError(f"no {err.__name__} for {words}")
    partial = nn.Parameter(DTensor.from_local(torch.ones(2), layout((2,))[0], [Partial()]))
    partial.grad = DTensor.from_local(torch.ones(2), layout((2,))[0], [Partial()])
    try:
        O.SGD([partial], lr=0.1).step()
    except ValueError as e:
        assert "params[0]" in str(e) and "Partial" in str(e), str(e)
    else:
        raise AssertionError("no ValueError for a Partial param")


@case
def state_dict_round_trip_with_torch():
    """Under FSDP2, torch.distributed.checkpoint's optimizer state dict of ours loads
    into torch.optim.AdamW, and torch's into ours: training goes on alike."""
    import copy

    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import dlopt_kernels.optim as O
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 2))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    fully_shard(a, mesh=mesh)
    fully_shard(b, mesh=mesh)
    opt_a = O.AdamW(a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)

    def train_both():
        x = torch.randn(4, 5, generator=gen)
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()

    def saved(m, opt):  # as through a file: torch.optim's loading would alias the tensors
        return torch.utils._pytree.tree_map(
            lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v,
            get_optimizer_state_dict(m, opt))

    errors = []
    train_both()
    # ours' moments into torch (replacing torch's own, a rounding apart), then back
    set_optimizer_state_dict(b, opt_b, saved(a, opt_a))
    train_both()
    set_optimizer_state_dict(a, opt_a, saved(b, opt_b))
    train_both()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_same(pa, pb.full_tensor(), "params", False, errors=errors)
        for key in ("exp_avg", "exp_avg_sq"):
            sa, sb = opt_a.state[pa][key], opt_b.state[pb][key]
            if type(sa) is not type(sb) or sa.placements != sb.placements:
                errors.append(f"{key}: {type(sa).__name__} {sa.placements} after loading")
            assert_same(sa, sb.full_tensor(), key, False, errors=errors)
        if float(opt_a.state[pa]["step"]) != 3.0:
            errors.append(f"step {opt_a.state[pa]['step']}")
    raise_errors(errors)


@case
def state_dict_round_trip_every_optimizer():
    """Under FSDP2, each optimizer's torch.distributed.checkpoint state dict (cloned, as
    through a file) loads into a fresh copy of itself, which then steps as the original
    does, bit for bit; with bf16 master weights too (master_param is a DTensor)."""
    import copy

    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import dlopt_kernels.optim as O
    mesh = init_device_mesh("cpu", (WORLD,))
    errors = []
    for cls, kw in CONFIGS.values():
        for dtype, extra in ((torch.float32, {}), (torch.bfloat16, dict(master_weights=True))):
            if "backend" in kw and dtype != torch.float32:
                continue
            torch.manual_seed(0)
            base = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 2)).to(dtype)
            a, b = copy.deepcopy(base), copy.deepcopy(base)
            fully_shard(a, mesh=mesh)
            fully_shard(b, mesh=mesh)
            opt_a = getattr(O, cls)(a.parameters(), **kw, **extra)
            x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)).to(dtype)

            def step(m, opt):
                opt.zero_grad()
                m(x).float().square().mean().backward()
                opt.step()

            step(a, opt_a)
            step(b, getattr(O, cls)(b.parameters(), **kw, **extra))  # b's params as a's
            opt_b = getattr(O, cls)(b.parameters(), **kw, **extra)
            saved = torch.utils._pytree.tree_map(
                lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v,
                get_optimizer_state_dict(a, opt_a))
            where = f"{cls} {kw} {dtype}"
            try:
                set_optimizer_state_dict(b, opt_b, saved)
            except Exception as e:  # noqa: BLE001 -- every rank raises alike
                errors.append(f"{where}: loading raised {type(e).__name__}: {e}")
                continue
            step(a, opt_a)
            step(b, opt_b)
            for pa, pb in zip(a.parameters(), b.parameters()):
                assert_same(pa, pb.full_tensor(), where, True, errors=errors)
    raise_errors(errors)


@case
def compiled_step_under_fsdp2():
    """torch.compile(fullgraph=True) of AdamW's and LAMB's step over FSDP2's DTensor
    params: AdamW gives the eager step's bits; compiled LAMB takes the gathering path
    (the shard path's reference kernel reads values on the host), a rounding apart from
    the eager shard path."""
    import copy
    import tempfile

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import dlopt_kernels.optim as O
    # one inductor cache per rank: four processes compile at once
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor{dist.get_rank()}")
    mesh = init_device_mesh("cpu", (WORLD,))
    errors = []
    for cls in ("AdamW", "LAMB"):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 2))
        eager, comp = copy.deepcopy(base), copy.deepcopy(base)
        fully_shard(eager, mesh=mesh)
        fully_shard(comp, mesh=mesh)
        opt_e = getattr(O, cls)(eager.parameters(), lr=1e-2)
        opt_c = getattr(O, cls)(comp.parameters(), lr=1e-2)
        compiled = torch.compile(opt_c.step, fullgraph=True)
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):
            x = torch.randn(4, 5, generator=gen)
            for m, step, opt in ((eager, opt_e.step, opt_e), (comp, compiled, opt_c)):
                opt.zero_grad()
                m(x).square().mean().backward()
                step()
        for pe, pc in zip(eager.parameters(), comp.parameters()):
            assert_same(pc, pe.full_tensor(), f"{cls} compiled", cls == "AdamW", errors=errors)
    torch._dynamo.reset()
    raise_errors(errors)


# ---------------------------------------------------------------------- entry


def run(rank, out_dir, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a timeout, so that a rank stuck in a collective fails the run instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    only = os.environ.get("DLOPT_DTENSOR_CASES")  # a comma-separated subset, to debug
    broken = None
    try:
        for name, fn in CASES.items():
            if only and name not in only.split(","):
                continue
            if broken is not None:
                results[name] = f"not run: {broken}"
                continue
            try:
                fn()
                results[name] = None
            except Exception:  # noqa: BLE001 -- reported per case by the test
                results[name] = traceback.format_exc()
            try:  # cases keep the ranks' collectives in step; if one did not, say so
                dist.barrier()
            except Exception as e:  # noqa: BLE001
                broken = f"the process group broke after {name}: {e}"
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
