"""The benchmark harness every dlopt benchmark reuses.

What it does, so each benchmark module only describes its cases:

- **Timing.** Every implementation of a case is built up front with its own tensors,
  warmed up, then timed *round-robin*: each round runs one step of every
  implementation (in a rotated order), so the drift of a noisy machine hits all of
  them alike. On the CPU a step is timed with ``time.perf_counter``. On CUDA, as
  ``triton.testing.do_bench`` does, an L2 flush and CUDA events around each step, the
  steps queued one after another without the host waiting in between ("queued": a step
  costs its GPU time, or its host time where that is longer, as in a training loop
  whose host runs ahead of the GPU); every ``IDLE_EVERY``-th round instead times each
  step from an idle GPU (a synchronize first), so the host's work before the first
  kernel counts in full ("from idle", reported beside). We report the median (and min)
  of all rounds; the number of rounds follows a time budget, between a floor and a cap.
- **Bandwidth.** The machine's memory bandwidth measured in the same run: a large
  in-place ``x.add_(y)`` on the CPU (read x, read y, write x: 12 bytes per fp32
  element), a device-to-device ``copy_`` on a GPU (read + write), median of several.
- **Bytes moved.** An optimizer step is memory bound; we count what it must move at
  least: the param read and written, the grad read, every state tensor read and
  written (``optimizer_bytes_per_param``). GB/s = bytes/param x numel / time.
- **Reporting.** ``format_report`` prints one table per case; ``write_results``
  merges a benchmark's section into ``benchmarks/results/<device>-<date>.json``
  without clobbering the other benchmarks' sections in that file (``report.py``; the
  run's environment comes from ``environment.py``).

Nothing here is specific to Adam: a new optimizer benchmark builds ``Case`` objects
from ``optimizer_impl(...)`` and hands them to ``run_cases``.
"""
from __future__ import annotations

import datetime as _dt
import gc
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

# where it ran and how it is reported, kept in their own modules; re-exported here, the
# one module every benchmark imports
from dlopt_kernels.bench.environment import _loadavg, device_slug, environment  # noqa: F401
from dlopt_kernels.bench.report import format_report, results_path, write_results  # noqa: F401

ROLES = ("ours", "baseline", "diag")

# On a GPU every IDLE_EVERY-th round times each step from an idle GPU (module docstring).
IDLE_EVERY = 4


# ----------------------------------------------------------------------------------------
# settings and cases
# ----------------------------------------------------------------------------------------
@dataclass
class Settings:
    """How long to time. Rounds run until `budget_s` (the timing time of one case,
    after warm-up) is spent, but at least `min_rounds` (unless twice the budget has
    passed: then at least 3) and at most `max_rounds`."""
    warmup: int = 3
    min_rounds: int = 10
    max_rounds: int = 200
    budget_s: float = 20.0
    # Bytes written between timed steps to flush caches (0: none). CUDA: do_bench's
    # 256 MB L2 flush. CPU: 0, because flushing a multi-hundred-MB LLC costs more than
    # the step; the round-robin order already runs the other implementations' tensors
    # through the cache between two steps of one implementation.
    flush_bytes: int = 0
    bandwidth_numel: int = 64 * 2**20
    bandwidth_reps: int = 7


def default_settings(device: torch.device, quick: bool) -> Settings:
    if quick:
        return Settings(warmup=1, min_rounds=3, max_rounds=10, budget_s=0.3,
                        flush_bytes=(8 * 2**20 if device.type == "cuda" else 0),
                        bandwidth_numel=4 * 2**20, bandwidth_reps=3)
    # DLOPT_BENCH_BUDGET_S shortens (or lengthens) each case's timing budget, for a
    # GPU lease that must fit every benchmark into a few minutes.
    budget = _env_budget()
    if device.type == "cuda":
        return Settings(warmup=10, min_rounds=50, max_rounds=500,
                        budget_s=10.0 if budget is None else budget,
                        flush_bytes=256 * 2**20, bandwidth_numel=256 * 2**20,
                        bandwidth_reps=20)
    return Settings() if budget is None else Settings(budget_s=budget)


def _env_budget() -> Optional[float]:
    raw = os.environ.get("DLOPT_BENCH_BUDGET_S", "")
    if not raw:
        return None
    try:
        budget = float(raw)
    except ValueError:
        budget = float("nan")
    if not budget > 0 or budget == float("inf"):
        raise ValueError(f"DLOPT_BENCH_BUDGET_S must be a positive number of seconds, got {raw!r}")
    return budget


class Runner:
    """One timed implementation: `step()` is what is timed; `bytes_per_param()` is
    asked after warm-up (optimizer state is created lazily by the first step)."""

    numel: int = 0

    def step(self) -> Any:
        raise NotImplementedError

    def bytes_per_param(self) -> float:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}


@dataclass
class Impl:
    """An implementation of a case. `build()` allocates its tensors and returns a Runner.
    role: "ours" (gets speedups vs every baseline of the case), "baseline", or "diag"
    (a diagnostic row, e.g. the bare kernel without the optimizer's Python)."""
    label: str
    role: str
    build: Callable[[], Runner]
    note: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")


@dataclass
class Case:
    name: str
    title: str
    numel: int
    num_tensors: int
    impls: list[Impl]
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------
# optimizers as runners
# ----------------------------------------------------------------------------------------
def make_params(shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> list[torch.nn.Parameter]:
    """Fresh params of `shapes` with random grads set. The same seed gives the same
    values, so every implementation of a case starts from identical data, but each
    owns its tensors (steps are independent)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
        g = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).mul_(1e-2)
        param = torch.nn.Parameter(p.to(dtype))
        param.grad = g.to(dtype)
        params.append(param)
    return params


def optimizer_bytes_per_param(opt: torch.optim.Optimizer) -> float:
    """Least bytes one step must move per param element: each param read + written,
    each grad read, each state tensor (except the scalar 'step') read + written.
    fp32 AdamW: 4+4 + 4 + 2*(4+4) = 28."""
    total = 0
    numel = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            numel += p.numel()
            total += 2 * p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size()
            for key, value in opt.state.get(p, {}).items():
                if key != "step" and isinstance(value, torch.Tensor):
                    total += 2 * value.numel() * value.element_size()
    return total / max(numel, 1)


class OptimizerRunner(Runner):
    def __init__(self, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        self.opt = opt
        self.params = params
        self.numel = sum(p.numel() for p in params)

    def step(self) -> Any:
        return self.opt.step()

    def bytes_per_param(self) -> float:
        return optimizer_bytes_per_param(self.opt)

    def describe(self) -> dict[str, Any]:
        state_dtypes = sorted({str(v.dtype).replace("torch.", "")
                               for st in self.opt.state.values() for k, v in st.items()
                               if k != "step" and isinstance(v, torch.Tensor)})
        return {"class": f"{type(self.opt).__module__}.{type(self.opt).__name__}",
                "param_dtype": str(self.params[0].dtype).replace("torch.", ""),
                "state_dtypes": state_dtypes}


def optimizer_impl(label: str, role: str, make_opt: Callable[[list], torch.optim.Optimizer],
                   shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device,
                   seed: int = 0, note: str = "") -> Impl:
    """An Impl that times `make_opt(params).step()` on its own fresh params."""
    def build() -> Runner:
        params = make_params(shapes, dtype, device, seed)
        return OptimizerRunner(make_opt(params), params)
    return Impl(label, role, build, note)


# ----------------------------------------------------------------------------------------
# shapes shared by optimizer benchmarks
# ----------------------------------------------------------------------------------------
def gpt2_small_shapes(width: float = 1.0) -> list[tuple[int, ...]]:
    """The 148 parameter shapes of GPT-2 small (HF layout: Conv1D weights are (in, out)):
    wte, wpe, 12 x [ln_1 w/b, attn.c_attn w/b, attn.c_proj w/b, ln_2 w/b, mlp.c_fc w/b,
    mlp.c_proj w/b], ln_f w/b = 124,439,808 params at width 1. `width` scales every
    dimension (d_model, vocab, positions), so params scale by width**2 and the tensor
    count and shape variety stay."""
    d = max(1, round(768 * width))
    vocab = max(1, round(50257 * width))
    ctx = max(1, round(1024 * width))
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,),                   # ln_1
                   (d, 3 * d), (3 * d,),         # attn.c_attn
                   (d, d), (d,),                 # attn.c_proj
                   (d,), (d,),                   # ln_2
                   (d, 4 * d), (4 * d,),         # mlp.c_fc
                   (4 * d, d), (d,)]             # mlp.c_proj
    shapes += [(d,), (d,)]                       # ln_f
    return shapes


def random_sizes(n: int, low: int, high: int, seed: int = 0) -> list[tuple[int]]:
    """`n` 1-D shapes with sizes drawn uniformly from [low, high] (fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    return [(int(s),) for s in torch.randint(low, high + 1, (n,), generator=gen)]


def numel_of(shapes: Iterable[Sequence[int]]) -> int:
    total = 0
    for s in shapes:
        k = 1
        for d in s:
            k *= d
        total += k
    return total


# ----------------------------------------------------------------------------------------
# what every optimizer benchmark module needs: device, our backends, targets
# ----------------------------------------------------------------------------------------
def bench_device(device: Optional[torch.device | str]) -> torch.device:
    """The device to benchmark on (default: cuda if available, else cpu), made current."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def ours_backends(op: str, device: torch.device, quick: bool) -> tuple[list[str], str]:
    """(backends of ours to time for public op `op`, the one backend='auto' picks):
    cuda and triton on a GPU, cpu on the CPU, plus the slow reference in quick runs;
    auto's choice first."""
    from dlopt_kernels.backends import registry
    auto = registry.resolve(op, device, "auto")[0]
    wanted = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    if quick:
        wanted += ("reference",)
    chosen = [b for b in registry.available_backends(device.type) if b in wanted]
    if auto not in chosen:
        chosen.insert(0, auto)
    chosen.sort(key=lambda b: b != auto)  # auto's choice first
    return chosen, auto


def evaluate_targets(section: dict[str, Any], targets: Sequence[tuple], auto: str,
                     device: torch.device, gpu_targets: Sequence[tuple] = (),
                     backends: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Check measured numbers against targets, each (case, ours label pattern with
    "{b}" for the backend, baseline label or None for "% of measured bandwidth",
    threshold). `targets` hold for the CPU (our `auto` backend); `gpu_targets` for a GPU,
    for each of `backends` (default: `auto`)."""
    if device.type == "cpu":
        plan = [(t, auto) for t in targets]
    else:
        plan = [(t, b) for b in (backends or [auto]) for t in gpu_targets]
    cases = {c["name"]: c for c in section["cases"]}
    out = []
    for (case_name, ours_pat, base, threshold), backend in plan:
        ours = ours_pat.format(b=backend)
        case = cases.get(case_name)
        value = idle = None  # idle: the same from an idle GPU (information, not judged)
        if base is None:
            what, unit = f"{ours} % of measured bandwidth", "%"
            row = next((r for r in case["results"] if r["label"] == ours), None) if case else None
            if row and row.get("pct_bandwidth") is not None:
                value, idle = row["pct_bandwidth"], row.get("idle_pct_bandwidth")
        else:
            what, unit = f"speedup of {ours} vs {base}", "x"
            for sp in (case or {}).get("speedups", []):
                if sp["ours"] == ours and sp["baseline"] == base:
                    value, idle = sp["speedup"], sp.get("speedup_idle")
        out.append({"case": case_name, "what": what, "value": value, "threshold": threshold,
                    "unit": unit, "met": None if value is None else bool(value >= threshold)})
        if idle is not None:
            out[-1]["value_idle"] = idle
    return out


def fp32_case(name: str, title: str, shapes: Sequence[Sequence[int]],
              ours: Callable[[str], Callable[[list], torch.optim.Optimizer]],
              baselines: dict[str, Callable[[list], torch.optim.Optimizer]],
              device: torch.device, backends: Sequence[str], auto: str,
              info: Optional[dict[str, Any]] = None) -> Case:
    """A case of fp32 params of `shapes`: ours on each of `backends` (`ours(backend)`
    makes a factory), then each torch baseline (label -> factory)."""
    impls = [optimizer_impl(f"dlopt[{b}]", "ours", ours(b), shapes, torch.float32, device,
                            note="backend='auto' picks this" if b == auto else "")
             for b in backends]
    impls += [optimizer_impl(label, "baseline", make, shapes, torch.float32, device)
              for label, make in baselines.items()]
    return Case(name, title, numel_of(shapes), len(shapes), impls, info=dict(info or {}))


def gpt2_case_shapes(device: torch.device, quick: bool) -> tuple[float, list, str]:
    """The ``gpt2_small`` case's (width, shapes, title): the 148 GPT-2 small shapes, every
    dimension x width (1 on a GPU, 1/3 on the CPU, 1/48 in quick runs)."""
    width = (1 / 48) if quick else (1.0 if device.type == "cuda" else 1 / 3)
    shapes = gpt2_small_shapes(width)
    title = ("GPT-2 small shapes (124M)" if width == 1.0 else
             f"GPT-2 small shapes, every dimension x {width:.4g} (d_model {shapes[2][0]}, "
             f"vocab {shapes[0][0]}, positions {shapes[1][0]})")
    return width, shapes, title


def fp64_case(op_name: str, ours: Callable[..., Callable[[list], torch.optim.Optimizer]],
              baselines: dict[str, Callable[[list], torch.optim.Optimizer]],
              device: torch.device, quick: bool) -> Case:
    """``fp64_gpt2``: the shapes of ``gpt2_small`` in float64, ours under backend='auto'
    (float64 params go where `op_name` computes them in double) against each of
    `baselines` (label -> factory) on float64 params. For information: no target."""
    from dlopt_kernels.backends import registry
    f64 = torch.float64
    width, shapes, title = gpt2_case_shapes(device, quick)
    chosen = registry.resolve(op_name, device, "auto", f64, quiet=True)[0]
    impls = [optimizer_impl(f"dlopt[{chosen}] fp64", "ours", ours("auto"), shapes, f64, device,
                            note="backend='auto' picks this for float64")]
    impls += [optimizer_impl(f"{label} fp64", "baseline", make, shapes, f64, device)
              for label, make in baselines.items()]
    return Case("fp64_gpt2", f"{title}, float64 params", numel_of(shapes), len(shapes), impls,
                info={"width": width})


def standard_optimizer_cases(ours: Callable[..., Callable[[list], torch.optim.Optimizer]],
                             baselines: dict[str, Callable[[list], torch.optim.Optimizer]],
                             device: torch.device, quick: bool, backends: Sequence[str],
                             auto: str, fastest: str) -> list[Case]:
    """The four cases every element-wise optimizer benchmark runs, with ours on each of
    `backends` (`ours(backend, **extra)` makes a factory; extra is master_weights /
    stochastic_rounding) and the torch `baselines` (label -> factory):

    1. ``fp32_10m``   one 10M-element fp32 tensor (50K in quick runs);
    2. ``gpt2_small`` the 148 GPT-2 small shapes (every dimension x 1/3 on the CPU);
    3. ``tiny_1000``  1,000 fp32 tensors of 1K-4K elements: per-call overhead;
    4. ``bf16_10m``   bf16 params: ours with stochastic rounding and with master weights
       vs baseline `fastest` on fp32 params and on bf16 params (bf16 states)."""
    cuda = device.type == "cuda"
    f32, bf16 = torch.float32, torch.bfloat16

    def case(name, title, shapes, info=None):
        return fp32_case(name, title, shapes, ours, baselines, device, backends, auto, info)

    cases = []
    n = 50_000 if quick else 10_000_000
    cases.append(case("fp32_10m", f"one {n:,}-element fp32 tensor", [(n,)]))
    width, shapes, title = gpt2_case_shapes(device, quick)
    cases.append(case("gpt2_small", title, shapes,
                      info={"width": width, "shapes": [list(s) for s in shapes]}))
    count = 30 if quick else 1000
    shapes = random_sizes(count, 1024, 4096, seed=1234)
    cases.append(case("tiny_1000", f"{count} fp32 tensors of 1,024-4,096 elements (random)",
                      shapes, info={"sizes": [s[0] for s in shapes]}))
    impls = []
    for b in backends:
        impls.append(optimizer_impl(f"dlopt[{b}] bf16 SR", "ours",
                                    ours(b, stochastic_rounding=True), [(n,)], bf16, device,
                                    note="bf16 params, fp32 states, stochastic rounding"))
        impls.append(optimizer_impl(f"dlopt[{b}] bf16 master", "ours",
                                    ours(b, master_weights=True), [(n,)], bf16, device,
                                    note="bf16 params, fp32 states + fp32 master weights"))
    impls.append(optimizer_impl(f"{fastest} fp32", "baseline", baselines[fastest], [(n,)], f32,
                                device, note="fp32 params and states"))
    impls.append(optimizer_impl(f"{fastest} bf16", "baseline", baselines[fastest], [(n,)], bf16,
                                device, note="bf16 params and bf16 states (for information)"))
    cases.append(Case("bf16_10m", f"{n:,} bf16 params vs the same count in fp32", n, 1, impls))
    return cases


# ----------------------------------------------------------------------------------------
# clocks
# ----------------------------------------------------------------------------------------
class _Clock:
    """Times steps on `device`. CPU: perf_counter around the call (CPU ops are
    synchronous). CUDA, two ways (module docstring): `time_ms` from an idle GPU;
    `enqueue` + `drain` queued. Each step follows an L2 flush of `flush_bytes`."""

    # How many steps' events may wait to be read (a drain then reads them): the host
    # runs at most this far ahead of the GPU.
    MAX_PENDING = 64

    def __init__(self, device: torch.device, flush_bytes: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.flush_buf = (torch.empty(flush_bytes, dtype=torch.int8, device=device)
                          if flush_bytes else None)
        self.pending: list[tuple[Any, Any, Any]] = []
        self.drained: list[tuple[Any, float]] = []

    def event(self) -> Any:
        """A timing event (CUDA only; tests replace it with a simulated GPU's)."""
        return torch.cuda.Event(enable_timing=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _flush(self) -> None:
        if self.flush_buf is not None:
            self.flush_buf.zero_()

    def time_ms(self, fn: Callable[[], Any]) -> float:
        """Milliseconds `fn()` takes: GPU time between two events on the current stream
        with the GPU idle at the start (so the host's work before the first kernel is
        counted in full), or perf_counter time on the CPU."""
        self._flush()
        if self.cuda:
            start, end = self.event(), self.event()
            self.sync()
            start.record()
            fn()
            end.record()
            self.sync()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def enqueue(self, key: Any, fn: Callable[[], Any]) -> None:
        """Time `fn()` queued behind the work before it; `drain()` returns (key, ms).
        On a GPU with nothing queued (after a drain) `fn()` first runs once untimed, so
        the GPU has work while the host queues the timed step."""
        if not self.cuda:
            self.drained.append((key, self.time_ms(fn)))
            return
        if not self.pending:
            self._flush()
            fn()
        self._flush()
        start, end = self.event(), self.event()
        start.record()
        fn()
        end.record()
        self.pending.append((key, start, end))
        if len(self.pending) >= self.MAX_PENDING:
            self._read()

    def _read(self) -> None:
        self.sync()
        self.drained += [(key, float(s.elapsed_time(e))) for key, s, e in self.pending]
        self.pending.clear()

    def drain(self) -> list[tuple[Any, float]]:
        """Every (key, ms) enqueued since the last drain, in order (waits for the GPU)."""
        if self.pending:
            self._read()
        out, self.drained = self.drained, []
        return out

    def time_queued(self, fn: Callable[[], Any], reps: int) -> list[float]:
        """`reps` queued timings of `fn()` (plain timings on the CPU)."""
        for _ in range(reps):
            self.enqueue(None, fn)
        return [ms for _, ms in self.drain()]


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# ----------------------------------------------------------------------------------------
# bandwidth
# ----------------------------------------------------------------------------------------
def measure_bandwidth(device: torch.device, settings: Settings) -> dict[str, Any]:
    """The machine's memory bandwidth in GB/s (1e9 bytes/s), median of several reps.
    CPU: x.add_(y) on two fp32 arrays (12 bytes/elem: read x, read y, write x).
    CUDA: dst.copy_(src) device to device (8 bytes/elem: read + write), timed queued."""
    n = settings.bandwidth_numel
    clock = _Clock(device, settings.flush_bytes)
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.full((n,), 1e-7, dtype=torch.float32, device=device)
    if device.type == "cuda":
        method, bytes_per_elem = "dst.copy_(src), fp32, device to device (read + write)", 8
        fn = lambda: x.copy_(y)  # noqa: E731
    else:
        method, bytes_per_elem = "x.add_(y), fp32 (read x, read y, write x)", 12
        fn = lambda: x.add_(y)  # noqa: E731
    for _ in range(2):  # warm-up: page faults, thread pool start
        clock.time_ms(fn)
    # queued, as the steps' headline times are
    samples = clock.time_queued(fn, settings.bandwidth_reps)
    del x, y
    return {"method": method, "numel": n, "bytes_per_elem": bytes_per_elem,
            "threads": torch.get_num_threads(), "samples_ms": [round(s, 4) for s in samples],
            "median_ms": _median(samples),
            "gbps": bytes_per_elem * n / (_median(samples) * 1e-3) / 1e9}


def combine_bandwidth(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool the samples of several bandwidth measurements of the same method (e.g. one
    before and one after the cases) into one median."""
    first = parts[0]
    samples = [s for p in parts for s in p["samples_ms"]]
    med = _median(samples)
    return {**{k: first[k] for k in ("method", "numel", "bytes_per_elem", "threads")},
            "samples_ms": samples, "median_ms": med,
            "gbps": first["bytes_per_elem"] * first["numel"] / (med * 1e-3) / 1e9,
            "gbps_per_measurement": [p["gbps"] for p in parts]}


# ----------------------------------------------------------------------------------------
# running cases
# ----------------------------------------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, unit="round", dynamic_ncols=True,
                file=sys.stderr)


def run_case(case: Case, device: torch.device, settings: Settings,
             bandwidth_gbps: Optional[float], progress: bool = True,
             clock: Optional[_Clock] = None) -> dict[str, Any]:
    """Build, warm up and time every implementation of `case` round-robin."""
    clock = clock or _Clock(device, settings.flush_bytes)
    runners: dict[str, Runner] = {}
    errors: dict[str, str] = {}
    warm: dict[str, list[float]] = {}
    for impl in case.impls:  # build and warm up each; one that fails is reported, not timed
        try:
            runner = impl.build()
            warm[impl.label] = [clock.time_ms(runner.step) for _ in range(max(1, settings.warmup))]
            runners[impl.label] = runner
        except Exception as exc:  # noqa: BLE001 - report any failure in the table
            errors[impl.label] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    labels = list(runners)
    samples: dict[str, list[float]] = {label: [] for label in labels}
    idle: dict[str, list[float]] = {label: [] for label in labels}  # GPU only

    def collect(drained):
        for label, ms in drained:
            samples[label].append(ms)

    round_ms = sum(_median(warm[label][-max(1, len(warm[label]) - 1):]) for label in labels)
    rounds = 0
    if labels:
        # Rounds: until the budget is spent (at least min_rounds, at most max_rounds).
        # The estimate from the warm-up only sizes the progress bar.
        estimate = int(settings.budget_s * 1e3 / max(round_ms, 1e-3))
        estimate = max(settings.min_rounds, min(settings.max_rounds, estimate))
        bar = _progress(estimate, case.name, progress)
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            t_start = time.perf_counter()
            while rounds < settings.max_rounds:
                elapsed = time.perf_counter() - t_start
                # past the budget: stop once min_rounds are done; past twice the budget
                # (a machine so busy a round takes seconds): stop after 3 rounds.
                if elapsed >= settings.budget_s and (
                        rounds >= settings.min_rounds
                        or (elapsed >= 2 * settings.budget_s and rounds >= 3)):
                    break
                k = rounds % len(labels)  # rotate the order: nobody always follows the same impl
                order = labels[k:] + labels[:k]
                if clock.cuda and rounds % IDLE_EVERY == IDLE_EVERY - 1:
                    collect(clock.drain())  # read the queued steps before the GPU idles
                    for label in order:
                        idle[label].append(clock.time_ms(runners[label].step))
                else:
                    for label in order:
                        clock.enqueue(label, runners[label].step)
                    if not clock.cuda:
                        collect(clock.drain())
                rounds += 1
                if bar is not None:
                    if rounds > bar.total:
                        bar.total = rounds
                    bar.update(1)
            collect(clock.drain())
        finally:
            if gc_was_enabled:
                gc.enable()
            if bar is not None:
                bar.close()

    results = []
    for impl in case.impls:
        row: dict[str, Any] = {"label": impl.label, "role": impl.role}
        if impl.note:
            row["note"] = impl.note
        if impl.label in errors:
            row["error"] = errors[impl.label]
            results.append(row)
            continue
        runner = runners[impl.label]
        xs = samples[impl.label]
        med, mn = _median(xs), min(xs)
        bpp = runner.bytes_per_param()
        gbps = bpp * runner.numel / (med * 1e-3) / 1e9
        row.update(runner.describe())
        row.update({"median_ms": med, "min_ms": mn, "bytes_per_param": bpp,
                    "gbps": gbps,
                    "pct_bandwidth": (100.0 * gbps / bandwidth_gbps) if bandwidth_gbps else None,
                    "warmup_ms": [round(s, 4) for s in warm[impl.label]],
                    "samples_ms": [round(s, 4) for s in xs]})
        if idle[impl.label]:
            idle_med = _median(idle[impl.label])
            idle_gbps = bpp * runner.numel / (idle_med * 1e-3) / 1e9
            row.update({"idle_median_ms": idle_med, "idle_gbps": idle_gbps,
                        "idle_pct_bandwidth": (100.0 * idle_gbps / bandwidth_gbps)
                        if bandwidth_gbps else None,
                        "idle_samples_ms": [round(s, 4) for s in idle[impl.label]]})
        results.append(row)

    speedups = []
    timed = {r["label"]: r for r in results if "median_ms" in r}
    for ours in (r for r in results if r["role"] == "ours" and r["label"] in timed):
        for base in (r for r in results if r["role"] == "baseline" and r["label"] in timed):
            a, b = samples[ours["label"]], samples[base["label"]]
            speedups.append({
                "ours": ours["label"], "baseline": base["label"],
                # the headline: baseline median / our median
                "speedup": base["median_ms"] / ours["median_ms"],
                # the same, paired within each round (robust to drift between rounds)
                "speedup_paired_median": _median([y / x for x, y in zip(a, b)]),
            })
            if "idle_median_ms" in ours and "idle_median_ms" in base:
                speedups[-1]["speedup_idle"] = base["idle_median_ms"] / ours["idle_median_ms"]
    del runners
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"name": case.name, "title": case.title, "numel": case.numel,
            "num_tensors": case.num_tensors, "rounds": rounds, "warmup": settings.warmup,
            "info": case.info, "results": results, "speedups": speedups}


def run_benchmark(name: str, build_cases: Callable, targets: Sequence[tuple], quick: bool,
                  device: Optional[torch.device | str], progress: bool,
                  settings: Optional[Settings], gpu_targets: Sequence[tuple] = (),
                  **info: Any) -> dict[str, Any]:
    """What every benchmark module's `run` does: pick the device and settings, build
    the cases (`build_cases(device, quick) -> (cases, backends, auto)`), time them,
    and return the section with `info` (hyperparameters and such, tuples stored as
    lists), our backends and the targets evaluated."""
    import dlopt_kernels  # noqa: F401  (loads the compiled library, registers backends)

    device = bench_device(device)
    settings = settings or default_settings(device, quick)
    cases, backends, auto = build_cases(device, quick)
    section = run_cases(name, cases, device, settings, quick, progress)
    for key, value in info.items():
        section[key] = ({k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
                        if isinstance(value, dict) else value)
    section["ours_backends"] = backends
    section["auto_backend"] = auto
    section["targets"] = evaluate_targets(section, targets, auto, device, gpu_targets, backends)
    return section


def run_cases(benchmark: str, cases: Sequence[Case], device: torch.device, settings: Settings,
              quick: bool, progress: bool = True) -> dict[str, Any]:
    """Measure the bandwidth, run every case, measure the bandwidth again; the section
    that `format_report` prints and `write_results` stores."""
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    load_start = _loadavg()
    bw_before = measure_bandwidth(device, settings)
    # Build cases lazily is the caller's job; here they are just run in order.
    case_results = []
    for case in cases:
        case_results.append(run_case(case, device, settings, bw_before["gbps"], progress))
    bw_after = measure_bandwidth(device, settings)
    bandwidth = combine_bandwidth([bw_before, bw_after])
    # Recompute % of bandwidth against the pooled measurement.
    for c in case_results:
        for row in c["results"]:
            if "gbps" in row:
                row["pct_bandwidth"] = 100.0 * row["gbps"] / bandwidth["gbps"]
            if "idle_gbps" in row:
                row["idle_pct_bandwidth"] = 100.0 * row["idle_gbps"] / bandwidth["gbps"]
    timing = ("perf_counter around each step" if device.type == "cpu" else
              f"queued: CUDA events around each step, steps queued without a host wait "
              f"(triton.testing.do_bench's recipe); idle_*: every {IDLE_EVERY}th round, "
              f"each step from an idle GPU (synchronized first: host time before the "
              f"first kernel counted in full)")
    return {"benchmark": benchmark, "quick": quick, "env": environment(device),
            "timing": timing,
            "started_utc": started.isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - t0, 2),
            "load_average_start": load_start,
            "settings": settings.__dict__.copy(), "bandwidth": bandwidth,
            "cases": case_results}
