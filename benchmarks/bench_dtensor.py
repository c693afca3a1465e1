#!/usr/bin/env python
"""Benchmark dlopt_kernels.optim.AdamW on FSDP2's DTensor params vs torch.optim.AdamW.

On the same Shard(0) DTensors, one rank: torch's fused and foreach AdamW as baselines.

    python benchmarks/bench_dtensor.py            # full run, writes benchmarks/results/
    python benchmarks/bench_dtensor.py --quick    # a few seconds; writes nothing

The cases and the harness live in the package (dlopt_kernels/bench/dtensor.py and
common.py) so that `dlopt-kernels bench dtensor` runs the same code.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's package, installed or not

from dlopt_kernels import bench  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench.script_main("dtensor", HERE / "results", description=__doc__.splitlines()[0]))
