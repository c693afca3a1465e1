"""The host time of a Triton Adam step, measured without a GPU: the Triton launcher's
Python (list checks, step counting, scratch copies, tables, launch groups) runs on CPU
tensors with the kernel launch replaced by a no-op, so what is timed is everything a
step does on the host but the launch itself. On a GPU that host time is spent before
the kernel starts (benchmarks/bench_optim_adam.py times it; tools/triton_sizes.py
separates it from the GPU time).

    python tools/triton_host_time.py [--reps N]
    DLOPT_TRITON_PY_TABLES=1 python tools/triton_host_time.py   # the Python tables

Prints the median milliseconds per step for the GPT-2-small list (148 tensors; shapes
at width 0.25 to keep the memory small: the host work depends on the tensor count, not
the sizes) and for 1,000 tiny tensors: until the first (stubbed) launch, which is the
host time a GPU waits through, and the whole step, which adds what runs after the
launches (the step counts' foreach add, here on CPU tensors, and the version bumps).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dlopt_kernels.bench import common  # noqa: E402
from dlopt_kernels.triton import optim_adam  # noqa: E402


class _NoLaunch:
    """Stands in for the jitted kernel: `kernel[grid](...)` does nothing but note the
    time of the step's first launch."""

    first = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if _NoLaunch.first is None:
                _NoLaunch.first = time.perf_counter()
        return launch


def host_ms(shapes, reps: int) -> tuple[float, float]:
    """Median ms per step: (until the first launch, whole step)."""
    ps = common.make_params(shapes, torch.float32, torch.device("cpu"))
    grads = [p.grad for p in ps]
    m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    steps = [torch.zeros(()) for _ in ps]
    lr = torch.tensor(1e-3)

    def step():
        optim_adam.adam_step(ps, grads, m, v, [], [], steps, lr, 0.9, 0.999, 0.01, 1e-8,
                             False, False, True, None, None, None)

    for _ in range(3):
        step()
    times, before = [], []
    for _ in range(reps):
        _NoLaunch.first = None
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
        before.append((_NoLaunch.first - t0) * 1e3)
    return statistics.median(before), statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    real = optim_adam._adam_kernel
    optim_adam._adam_kernel = _NoLaunch()
    try:
        py = os.environ.get("DLOPT_TRITON_PY_TABLES", "0") not in ("", "0")
        print(f"tables in {'Python' if py else 'C++ (where the library loaded)'}")
        for name, shapes in (("gpt2_small (148 tensors)", common.gpt2_small_shapes(0.25)),
                             ("tiny_1000 (1000 tensors)", common.random_sizes(1000, 1024, 4096))):
            before, whole = host_ms(shapes, args.reps)
            print(f"{name}: {before:.3f} ms host before the launch, {whole:.3f} ms per step")
    finally:
        optim_adam._adam_kernel = real
    return 0


if __name__ == "__main__":
    sys.exit(main())
