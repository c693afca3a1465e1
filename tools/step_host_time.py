"""The host time of an eager optimizer step: what `AdamW.step()` costs the CPU before
the kernels (on a GPU: before the launches are queued), split into its parts, beside
torch's fused AdamW.

On a GPU the benchmark's step time (benchmarks/bench_optim_adam.py synchronizes before
every step) is at least this host time plus the kernels' GPU time, since the GPU idles
until the first launch; tools/triton_sizes.py gives the GPU time alone (graph replay).

    python tools/step_host_time.py [--device cpu|cuda] [--reps N]

Rows (median microseconds per call over N calls, after warm-up):
  step           dlopt AdamW(backend=<device's compiled backend>).step()
  collect        its C walk over the param group (_C.collect_group)
  kernel call    the compiled op on prebuilt lists (_C.call_compiled): argument
                 conversion, list checks, launch tables and launches (on a GPU), or the
                 CPU kernel itself (on the CPU)
  torch fused    torch.optim.AdamW(fused=True).step()
  profiler range an `Optimizer.step#AdamW.step` record_function entered and left: what
                 torch's step wrapper spends on every step, and ours only while profiling
  triton step    (on a GPU) dlopt AdamW(backend="triton").step()
On the CPU the tensors have one element, so the kernels' own work is as small as it gets
(the rows still include it); on a GPU they have the GPT-2-small shapes (148 tensors)
and 1,000 tensors of 1K-4K elements, and each timed call starts on an idle GPU
(synchronized before) and is timed on the host only (not synchronized after).
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

from dlopt_kernels import _C  # noqa: E402
from dlopt_kernels.bench import common  # noqa: E402
from dlopt_kernels.optim import AdamW  # noqa: E402

HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def _median_us(fn, reps: int, device: torch.device) -> float:
    cuda = device.type == "cuda"
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    if cuda:
        torch.cuda.synchronize(device)
    return statistics.median(times)


def case(shapes, device: torch.device, reps: int) -> dict[str, float]:
    backend = device.type  # the compiled backend of the device ("cpu" or "cuda")
    params = common.make_params(shapes, torch.float32, device)
    opt = AdamW(params, **HP, backend=backend)
    opt.step()  # state
    group = opt.param_groups[0]
    st = [opt.state[p] for p in params]
    lr = opt._lr_tensor(group["lr"], device)
    args = (params, [p.grad for p in params], [s["exp_avg"] for s in st],
            [s["exp_avg_sq"] for s in st], [], [], [s["step"] for s in st], lr, 0.9, 0.999,
            0.01, 1e-8, False, False, True, None, None, None)
    twin = [p.detach().clone().requires_grad_() for p in params]
    for p, q in zip(params, twin):
        q.grad = p.grad.clone()
    fused = torch.optim.AdamW(twin, **HP, fused=True)
    def profiler_range():
        with torch.autograd.profiler.record_function("Optimizer.step#AdamW.step"):
            pass

    rows = {
        "step": _median_us(opt.step, reps, device),
        "collect": _median_us(lambda: _C.collect_group(group["params"], opt.state,
                                                       ("step", "exp_avg", "exp_avg_sq"),
                                                       None), reps, device),
        "kernel call": _median_us(lambda: _C.call_compiled("adam_step", *args), reps, device),
        "torch fused": _median_us(fused.step, reps, device),
        "profiler range": _median_us(profiler_range, reps, device),
    }
    if device.type == "cuda":
        tri = AdamW(twin, **HP, backend="triton")
        rows["triton step"] = _median_us(tri.step, reps, device)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # host work is one thread; no OpenMP start-up in the rows
        cases = {"gpt2_small (148 x 1 element)": [(1,)] * 148,
                 "tiny_1000 (1000 x 1 element)": [(1,)] * 1000}
    else:
        cases = {"gpt2_small (148 tensors)": common.gpt2_small_shapes(1.0),
                 "tiny_1000 (1000 tensors)": common.random_sizes(1000, 1024, 4096)}
    print(f"host microseconds per call on {args.device}, median of {args.reps}")
    for name, shapes in cases.items():
        rows = case(shapes, device, args.reps)
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in rows.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
