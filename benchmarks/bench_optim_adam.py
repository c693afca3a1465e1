#!/usr/bin/env python
"""Benchmark dlopt_kernels.optim.AdamW against torch.optim.AdamW (fused, foreach, for-loop).

    python benchmarks/bench_optim_adam.py            # full run, writes benchmarks/results/
    python benchmarks/bench_optim_adam.py --quick    # a few seconds; writes nothing

The cases and the harness live in the package (dlopt_kernels/bench/optim_adam.py and
common.py) so that `dlopt-kernels bench adamw` runs the same code. See
benchmarks/README.md for what is measured and how.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's package, installed or not

from dlopt_kernels import bench  # noqa: E402

if __name__ == "__main__":
    # --quick, --out, --no-save, --device, --no-progress (see bench.script_main)
    sys.exit(bench.script_main("adamw", HERE / "results", description=__doc__.splitlines()[0]))
