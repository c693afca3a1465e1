#!/usr/bin/env python
"""Benchmark dlopt_kernels.optim.Adagrad against torch.optim.Adagrad (fused, foreach, for-loop).

    python benchmarks/bench_optim_adagrad.py            # full run, writes benchmarks/results/
    python benchmarks/bench_optim_adagrad.py --quick    # a few seconds; writes nothing

The cases and the harness live in the package (dlopt_kernels/bench/optim_adagrad.py and
common.py) so that `dlopt-kernels bench adagrad` runs the same code.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's package, installed or not

from dlopt_kernels import bench  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench.script_main("adagrad", HERE / "results", description=__doc__.splitlines()[0]))
