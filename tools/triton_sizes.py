"""Time the Triton element-wise launch sizes on a GPU: Adam's op-level step
(torch.ops.dlopt.adam_step with prebuilt lists, backend 'triton') for each
(BLOCK, ITERS, num_warps) variant of `_common.launch_sizes`, set through
DLOPT_TRITON_BLOCK / _ITERS / _WARPS, beside torch's fused AdamW and our CUDA op
in the same process. Each row has two times:

  op ms     CUDA events around one call after a sync and an L2 flush (the host's
            Python counts, as in benchmarks/bench_optim_adam.py);
  graph ms  the same call replayed from a CUDA graph: the GPU's time alone.

    python tools/triton_sizes.py --out DIR [--variants 4096,1,8 2048,8,4 ...]

Writes DIR/triton_sizes.json and prints a table, then `best: VAR=... ...`, the
variant with the lowest geometric mean op time over the cases, as shell
assignments (tools/gpu_check.sh exports them for the runs after it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dlopt_kernels.bench import common  # noqa: E402
from dlopt_kernels.bench.optim_adam import HPARAMS, _OpRunner  # noqa: E402
from dlopt_kernels.triton import _common  # noqa: E402

# the first is the default before this sweep (one 4096-element block a program)
VARIANTS = ["4096,1,8", "4096,2,8", "4096,4,8", "4096,8,8", "2048,4,4", "2048,8,4",
            "2048,16,8", "1024,8,4", "1024,16,4", "8192,2,8"]
VARS = ("DLOPT_TRITON_BLOCK", "DLOPT_TRITON_ITERS", "DLOPT_TRITON_WARPS")


def cases(quick):
    if quick:  # a dry run of this script (CPU, TRITON_INTERPRET=1)
        return {"gpt2_tiny": common.gpt2_small_shapes(0.02), "tiny_10": [(1000,)] * 10}
    return {"gpt2_small": common.gpt2_small_shapes(),
            "fp32_10m": [(10_000_000,)],
            "tiny_1000": common.random_sizes(1000, 1024, 4096)}


def time_call(clock, fn, reps):
    for _ in range(3):
        clock.time_ms(fn)
    return statistics.median(clock.time_ms(fn) for _ in range(reps))


def time_graph(clock, fn, reps):
    """GPU time of fn replayed from a CUDA graph; None if it cannot be captured."""
    if not clock.cuda:
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        print(f"  (no graph: {type(exc).__name__}: {str(exc)[:100]})")
        return None
    return time_call(clock, graph.replay, reps)


def _variant(text):
    """'BLOCK,ITERS,WARPS' as three ints (launch_sizes checks each as it runs)."""
    try:
        block, iters, warps = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not BLOCK,ITERS,WARPS (three integers)") from None
    return block, iters, warps


class _TorchFused:
    def __init__(self, shapes, device):
        params = common.make_params(shapes, torch.float32, device)
        self.opt = torch.optim.AdamW(params, **HPARAMS, fused=True)

    def step(self):
        self.opt.step()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", nargs="*", default=VARIANTS, type=_variant,
                    help="BLOCK,ITERS,WARPS triples (powers of two)")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="a CPU dry run of the script")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.quick else "cuda")
    clock = common._Clock(dev, 256 * 2**20 if dev.type == "cuda" else 0)
    variants = [_variant(v) if isinstance(v, str) else v for v in args.variants]
    rows = []

    def record(case, impl, runner):
        row = {"case": case, "impl": impl,
               "op_ms": time_call(clock, runner.step, args.reps),
               "graph_ms": time_graph(clock, runner.step, args.reps)}
        rows.append(row)
        g = row["graph_ms"]
        print(f"{case:11s} {impl:24s} op {row['op_ms']:8.3f} ms  graph "
              f"{'-' if g is None else f'{g:8.3f}'} ms", flush=True)

    all_cases = cases(args.quick)
    for case, shapes in all_cases.items():
        record(case, "torch fused", _TorchFused(shapes, dev))
        if dev.type == "cuda":
            record(case, "dlopt[cuda] op", _OpRunner(shapes, dev, "cuda", "op"))
        for v in variants:
            os.environ.update({k: str(x) for k, x in zip(VARS, v)})
            _common.reset_launch_sizes()  # read once per process otherwise
            try:
                record(case, "triton %d,%d,%d" % v, _OpRunner(shapes, dev, "triton", "op"))
            except Exception as exc:  # noqa: BLE001 - one variant's failure is a result
                print(f"{case} triton {v}: {type(exc).__name__}: {str(exc)[:200]}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for k in VARS:
        os.environ.pop(k, None)
    _common.reset_launch_sizes()

    def score(v):
        ts = [r["op_ms"] for r in rows if r["impl"] == "triton %d,%d,%d" % v]
        return (math.exp(sum(map(math.log, ts)) / len(ts)) if len(ts) == len(all_cases)
                else math.inf)

    best = min(variants, key=score)
    env = common.environment(dev)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_sizes.json"), "w") as f:
        json.dump({"env": env, "hparams": HPARAMS, "rows": rows, "best": best}, f, indent=1,
                  default=str)
    print("best: " + " ".join(f"{k}={x}" for k, x in zip(VARS, best)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
