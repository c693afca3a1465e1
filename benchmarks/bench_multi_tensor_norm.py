#!/usr/bin/env python
"""Benchmark dlopt_kernels.optim.clip_grad_norm_ (fused multi_tensor_norm) against
torch.nn.utils.clip_grad_norm_ (foreach, for-loop).

    python benchmarks/bench_multi_tensor_norm.py            # full run, writes benchmarks/results/
    python benchmarks/bench_multi_tensor_norm.py --quick    # a few seconds; writes nothing

The cases and the harness live in the package (dlopt_kernels/bench/multi_tensor_norm.py
and common.py) so that `dlopt-kernels bench clip_grad_norm` runs the same code.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's package, installed or not

from dlopt_kernels import bench  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench.script_main("clip_grad_norm", HERE / "results",
                               description=__doc__.splitlines()[0]))
