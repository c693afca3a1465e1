"""A small end-to-end demo: train the same model with torch.optim.AdamW and with
dlopt_kernels.optim.AdamW side by side, and (``--compare-precision``) measure what
bf16 params do to training with and without master weights / stochastic rounding.

Everything is generated here (no downloads) and deterministic for a given ``--seed``:
the task is to classify Gaussian points by the arg-max of a fixed random "teacher"
network, and the student is a small MLP.

    dlopt-kernels demo                        # torch AdamW(fused) vs ours, fp32
    dlopt-kernels demo --dtype bfloat16       # both on bf16 params
    python -m dlopt_kernels.demo --compare-precision   # the table in docs/low_precision.md
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# -- the task ----------------------------------------------------------------------------
@dataclass
class Task:
    """A fixed synthetic classification data set on one device."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    in_dim: int
    n_classes: int


def make_task(seed: int = 0, device: str = "cpu", in_dim: int = 32, n_classes: int = 10,
              n_train: int = 65536, n_eval: int = 2048, teacher_hidden: int = 64) -> Task:
    """Gaussian inputs labelled by the arg-max of a random two-layer tanh network."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(in_dim, teacher_hidden, generator=g) / math.sqrt(in_dim)
    b1 = 0.5 * torch.randn(teacher_hidden, generator=g)
    w2 = torch.randn(teacher_hidden, n_classes, generator=g) / math.sqrt(teacher_hidden)
    x = torch.randn(n_train + n_eval, in_dim, generator=g)
    y = (torch.tanh(x @ w1 + b1) @ w2).argmax(dim=1)
    x, y = x.to(device), y.to(device)
    return Task(x[:n_train], y[:n_train], x[n_train:], y[n_train:], in_dim, n_classes)


def make_model(task: Task, hidden: int = 512, depth: int = 3, seed: int = 0) -> nn.Module:
    """An MLP in fp32 on the CPU; callers copy it and move/cast the copies."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = task.in_dim
    for _ in range(depth - 1):
        layers += [nn.Linear(d, hidden), nn.GELU()]
        d = hidden
    layers.append(nn.Linear(d, task.n_classes))
    return nn.Sequential(*layers)


def batches(task: Task, batch_size: int, seed: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A deterministic stream of random mini-batches (the same for every optimizer)."""
    g = torch.Generator().manual_seed(seed + 1)
    n = task.x_train.shape[0]

    def next_batch():
        idx = torch.randint(n, (batch_size,), generator=g).to(task.x_train.device)
        return task.x_train[idx], task.y_train[idx]

    return next_batch


# -- one training run --------------------------------------------------------------------
@dataclass
class Run:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    dtype: torch.dtype
    train_losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # seconds of optimizer.step()
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)
    error: Optional[str] = None


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by every tensor in the optimizer's state (moments, step, master copy)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def eval_loss(run: Run, task: Task) -> float:
    out = run.model(task.x_eval.to(run.dtype))
    return float(F.cross_entropy(out.float(), task.y_eval))


def train(runs: Sequence[Run], task: Task, steps: int, batch_size: int, seed: int,
          eval_every: int = 0, progress: bool = True, desc: str = "training") -> None:
    """Train every run on the same batches, one step of each in turn (so machine noise
    hits all of them alike), timing optimizer.step() alone."""
    from tqdm.auto import tqdm

    next_batch = batches(task, batch_size, seed)
    device = task.x_train.device
    if eval_every:
        for r in runs:
            r.curve.append((0, eval_loss(r, task)))
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, unit="step",
               dynamic_ncols=True, leave=True)
    for step in bar:
        x, y = next_batch()
        for r in runs:
            if r.error is not None:
                continue
            r.model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(r.model(x.to(r.dtype)).float(), y)
            loss.backward()
            _sync(device)
            t0 = time.perf_counter()
            r.opt.step()
            _sync(device)
            r.step_times.append(time.perf_counter() - t0)
            r.train_losses.append(loss.item())
            if not math.isfinite(r.train_losses[-1]):
                r.error = f"loss became {r.train_losses[-1]} at step {step}"
        if eval_every and (step % eval_every == 0 or step == steps):
            for r in runs:
                if r.error is None and (not r.curve or r.curve[-1][0] != step):
                    r.curve.append((step, eval_loss(r, task)))
        if progress and step % 10 == 0:
            bar.set_postfix_str("loss " + " ".join(f"{r.train_losses[-1]:.3f}" for r in runs
                                                   if r.train_losses), refresh=False)
    bar.close()


def median_step_ms(run: Run) -> float:
    times = run.step_times
    warm = min(5, len(times) // 4)  # the first steps allocate state
    return 1e3 * statistics.median(times[warm:]) if times else float("nan")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    right = [i > 0 for i in range(len(headers))]

    def line(cells):
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return ("| " + " | ".join(cells) + " |") if markdown else "  ".join(cells)

    sep = ("|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2))
                          for w, r in zip(widths, right)) + "|") if markdown else \
        "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _speed(theirs_ms: float, ours_ms: float) -> str:
    r = theirs_ms / ours_ms
    return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


def torch_adamw(params, **kw) -> tuple[torch.optim.Optimizer, str]:
    """torch.optim.AdamW with fused=True where this torch supports it, else foreach."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw), "torch AdamW (fused)"
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kw), "torch AdamW (foreach)"


# -- `demo`: torch vs ours ---------------------------------------------------------------
def run_demo(steps: int = 200, device: str = "cpu", dtype: str = "float32", lr: float = 1e-3,
             weight_decay: float = 1e-2, batch_size: int = 256, hidden: int = 512, seed: int = 0,
             backend: str = "auto", master_weights: bool = False,
             stochastic_rounding: bool = False, progress: bool = True,
             out=None) -> dict:
    """Train torch.optim.AdamW and dlopt_kernels.optim.AdamW from the same init on the same
    batches; print and return the comparison."""
    from dlopt_kernels.backends import registry
    from dlopt_kernels.optim import AdamW

    out = out or sys.stdout
    dev = torch.device(device)
    tdtype = DTYPES[dtype]
    task = make_task(seed, device)
    base = make_model(task, hidden=hidden, seed=seed)
    kw = dict(lr=lr, weight_decay=weight_decay)

    m_torch = copy.deepcopy(base).to(device=dev, dtype=tdtype)
    opt_torch, torch_name = torch_adamw(m_torch.parameters(), **kw)
    m_ours = copy.deepcopy(base).to(device=dev, dtype=tdtype)
    opt_ours = AdamW(m_ours.parameters(), backend=backend, master_weights=master_weights,
                     stochastic_rounding=stochastic_rounding, **kw)
    used = registry.resolve("adam_step", dev, backend)[0]
    extras = [s for s, on in (("master weights", master_weights),
                              ("stochastic rounding", stochastic_rounding)) if on]
    ours_name = f"dlopt AdamW ({used}{', ' + ', '.join(extras) if extras else ''})"
    runs = [Run(torch_name, m_torch, opt_torch, tdtype), Run(ours_name, m_ours, opt_ours, tdtype)]

    print(f"dlopt-kernels demo: MLP {task.in_dim}-{hidden}-{hidden}-{task.n_classes} "
          f"({n_params(base):,} params, {dtype}) on {device}, {steps} steps of batch "
          f"{batch_size}, lr {lr:g}, weight_decay {weight_decay:g}, seed {seed}", file=out)
    torch.manual_seed(seed)
    train(runs, task, steps, batch_size, seed, progress=progress, desc="demo")

    rows, results = [], []
    for r in runs:
        final = eval_loss(r, task) if r.error is None else float("nan")
        sb = state_bytes(r.opt)
        res = dict(optimizer=r.name, step_ms=median_step_ms(r), state_bytes=sb,
                   state_bytes_per_param=sb / n_params(r.model), final_loss=final,
                   final_train_loss=r.train_losses[-1] if r.train_losses else float("nan"),
                   error=r.error)
        results.append(res)
        rows.append([r.name, f"{res['step_ms']:.3f}", f"{_fmt_bytes(sb)} ({res['state_bytes_per_param']:.1f} B/param)",
                     f"{final:.4f}" if r.error is None else f"diverged: {r.error}"])
    print("", file=out)
    print(format_table(["optimizer", "step time (median ms)", "optimizer state", "final loss"], rows),
          file=out)
    t, o = results
    if math.isfinite(t["final_loss"]) and math.isfinite(o["final_loss"]):
        print(f"\nfinal loss = cross-entropy on {task.x_eval.shape[0]} held-out points; "
              f"ours vs torch: optimizer step {_speed(t['step_ms'], o['step_ms'])}, final loss {100 * (o['final_loss'] - t['final_loss']) / t['final_loss']:+.2f}%",
              file=out)
    return {"runs": results, "steps": steps, "device": device, "dtype": dtype,
            "params": n_params(base)}


# -- `--compare-precision`: bf16 params with and without help -----------------------------
PRECISION_CONFIGS = (
    # name, param dtype, optimizer factory
    ("torch AdamW, fp32 params (reference)", torch.float32,
     lambda ps, kw: torch_adamw(ps, **kw)[0]),
    ("torch AdamW, bf16 params", torch.bfloat16, lambda ps, kw: torch_adamw(ps, **kw)[0]),
    ("dlopt AdamW, bf16 + master_weights", torch.bfloat16,
     lambda ps, kw: _ours(ps, kw, master_weights=True)),
    ("dlopt AdamW, bf16 + stochastic_rounding", torch.bfloat16,
     lambda ps, kw: _ours(ps, kw, stochastic_rounding=True)),
    ("dlopt AdamW, bf16 plain", torch.bfloat16, lambda ps, kw: _ours(ps, kw)),
)


def _ours(params, kw, **extra):
    from dlopt_kernels.optim import AdamW

    return AdamW(params, **kw, **extra)


def compare_precision(steps: int = 400, lrs: Sequence[float] = (1e-5, 1e-4, 1e-3), every: int = 50,
                      device: str = "cpu", batch_size: int = 256, hidden: int = 512,
                      weight_decay: float = 1e-2, seed: int = 0, progress: bool = True,
                      out=None) -> dict:
    """Train the same MLP with the five PRECISION_CONFIGS at each lr; print markdown tables
    of eval loss every `every` steps plus state bytes per param."""
    out = out or sys.stdout
    dev = torch.device(device)
    task = make_task(seed, device)
    base = make_model(task, hidden=hidden, seed=seed)
    n = n_params(base)
    from dlopt_kernels.backends import registry

    used = registry.resolve("adam_step", dev, "auto")[0]
    print(f"MLP {task.in_dim}-{hidden}-{hidden}-{task.n_classes}, {n:,} params, {steps} steps of "
          f"batch {batch_size}, weight_decay {weight_decay:g}, seed {seed}, device {device}, "
          f"dlopt backend {used}, torch {torch.__version__}; "
          f"loss = cross-entropy on {task.x_eval.shape[0]} held-out points, forward in the "
          f"params' dtype", file=out)
    results = {}
    for lr in lrs:
        kw = dict(lr=lr, weight_decay=weight_decay)
        runs = []
        for name, dtype, factory in PRECISION_CONFIGS:
            m = copy.deepcopy(base).to(device=dev, dtype=dtype)
            runs.append(Run(name, m, factory(m.parameters(), kw), dtype))
        torch.manual_seed(seed)  # stochastic rounding seeds come from the global generator
        t0 = time.perf_counter()
        train(runs, task, steps, batch_size, seed, eval_every=every, progress=progress,
              desc=f"lr={lr:g}")
        elapsed = time.perf_counter() - t0
        checkpoints = [s for s, _ in runs[0].curve]
        headers = ["optimizer"] + [f"step {s}" for s in checkpoints] + ["state B/param",
                                                                         "param B/param"]
        rows = []
        for r in runs:
            curve = dict(r.curve)
            rows.append([r.name] + [f"{curve[s]:.4f}" if s in curve else "—" for s in checkpoints]
                        + [f"{state_bytes(r.opt) / n:.1f}", f"{param_bytes(r.model) / n:.0f}"])
        print(f"\n### lr = {lr:g}\n", file=out)
        print(format_table(headers, rows, markdown=True), file=out)
        print(f"\n({steps} steps x {len(runs)} optimizers in {elapsed:.1f} s)", file=out)
        results[lr] = [dict(optimizer=r.name, curve=r.curve, state_bytes=state_bytes(r.opt),
                            params=n, error=r.error) for r in runs]
    return results


# -- command line ------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: 200 for the demo, 400 for --compare-precision)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="param dtype of both models in the demo (default: float32)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512, help="MLP width (default: 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto",
                   choices=("auto", "cpu", "cuda", "triton", "reference"),
                   help="dlopt backend (default: auto, or DLOPT_BACKEND)")
    p.add_argument("--master-weights", action="store_true",
                   help="ours keeps fp32 master weights (bf16 params)")
    p.add_argument("--stochastic-rounding", action="store_true",
                   help="ours rounds bf16 params stochastically")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compare-precision", action="store_true",
                   help="instead of the demo, compare bf16 training with and without master "
                        "weights / stochastic rounding (docs/low_precision.md)")
    p.add_argument("--lrs", default="1e-5,1e-4,1e-3",
                   help="comma-separated learning rates for --compare-precision")
    p.add_argument("--every", type=int, default=50,
                   help="evaluate every N steps for --compare-precision (default: 50)")


def run_from_args(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        print("error: --steps must be at least 1", file=sys.stderr)
        return 2
    if args.master_weights and args.stochastic_rounding:
        print("error: --master-weights and --stochastic-rounding exclude each other",
              file=sys.stderr)
        return 2
    from dlopt_kernels.backends import registry

    try:  # a bad DLOPT_BACKEND is a usage error, not a crash
        registry.requested_backend(args.backend)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.compare_precision:
        try:
            lrs = [float(s) for s in args.lrs.split(",") if s.strip()]
        except ValueError:
            print(f"error: --lrs must be comma-separated numbers, got {args.lrs!r}", file=sys.stderr)
            return 2
        compare_precision(steps=args.steps or 400, lrs=lrs, every=args.every, device=args.device,
                          batch_size=args.batch_size, hidden=args.hidden,
                          weight_decay=args.weight_decay, seed=args.seed,
                          progress=not args.no_progress)
        return 0
    try:
        res = run_demo(steps=args.steps or 200, device=args.device, dtype=args.dtype, lr=args.lr,
                       weight_decay=args.weight_decay, batch_size=args.batch_size,
                       hidden=args.hidden, seed=args.seed, backend=args.backend,
                       master_weights=args.master_weights,
                       stochastic_rounding=args.stochastic_rounding,
                       progress=not args.no_progress)
    except registry.BackendUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if any(r["error"] for r in res["runs"]) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlopt_kernels.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
