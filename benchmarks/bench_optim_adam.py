#!/usr/bin/env python
"""Benchmark dlopt_kernels.optim.AdamW against torch.optim.AdamW (fused, foreach, for-loop).

    python benchmarks/bench_optim_adam.py            # full run, writes benchmarks/results/
    python benchmarks/bench_optim_adam.py --quick    # a few seconds; writes nothing

The cases and the harness live in the package (dlopt_kernels/bench/optim_adam.py and
common.py) so that `dlopt-kernels bench adamw` runs the same code. See
benchmarks/README.md for what is measured and how.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's package, installed or not

from dlopt_kernels import bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, few rounds: proves it runs, numbers mean little")
    parser.add_argument("--out", default=None,
                        help="results folder or .json file to merge into (default: "
                             "benchmarks/results/ for a full run, nothing for --quick)")
    parser.add_argument("--no-save", action="store_true", help="do not write a results file")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    out = args.out
    if out is None and not args.quick:
        out = HERE / "results"
    if args.no_save:
        out = None
    bench.run("adamw", quick=args.quick, out=out, progress=not args.no_progress,
              device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
