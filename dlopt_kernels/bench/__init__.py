"""Benchmarks of dlopt_kernels against the torch baselines, timed in one process.

    >>> from dlopt_kernels import bench
    >>> results = bench.run("adamw", quick=True, out="benchmarks/results")

`run` prints a table per case and returns the results; with `out` it also merges
them into `<out>/<device>-<YYYY-MM-DD>.json` (or into `out` itself if it ends in
.json). The harness (timing, baselines, bandwidth, tables, JSON) is
`dlopt_kernels.bench.common`; each benchmark is one module that builds its cases.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Optional

# benchmark name (as typed on the command line) -> module in this package
BENCHMARKS = {
    "adam": "optim_adam",
    "adamw": "optim_adam",
    "sgd": "optim_sgd",
    "adagrad": "optim_adagrad",
    "rmsprop": "optim_rmsprop",
    "adafactor": "optim_adafactor",
    "lion": "optim_lion",
    "lamb": "optim_lamb",
    "clip_grad_norm": "multi_tensor_norm",
    "dtensor": "dtensor",
}


def names() -> list[str]:
    """The benchmark names `run` accepts."""
    return sorted(BENCHMARKS)


def run(name: str, quick: bool = False, out: Optional[os.PathLike | str] = None,
        progress: bool = True, device: Optional[str] = None) -> dict[str, Any]:
    """Run benchmark `name`, print its table and return its results dict.

    quick: tiny sizes and few rounds (a few seconds; numbers only prove it runs).
    out: a results folder or a .json file to merge the results into (None: do not
        write). A quick run is stored under "<benchmark>-quick" so it never replaces a
        full run's section.
    progress: show tqdm progress bars on stderr.
    device: "cpu", "cuda", "cuda:1", ... (default: cuda if available, else cpu).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(names())}")
    from dlopt_kernels.bench import common

    module = importlib.import_module(f"dlopt_kernels.bench.{BENCHMARKS[key]}")
    results = module.run(quick=quick, device=device, progress=progress)
    print(common.format_report(results), flush=True)
    if out is not None:
        section_key = results["benchmark"] + ("-quick" if quick else "")
        path = common.write_results(results, out, key=section_key)
        results["json_path"] = str(path)
        print(f"results written to {path} (section {section_key!r})", flush=True)
    return results


def script_main(name: str, results_dir: os.PathLike | str, argv: Optional[list[str]] = None,
                description: Optional[str] = None) -> int:
    """The command line of a `benchmarks/bench_<op>.py` script for benchmark `name`:
    --quick, --out, --no-save, --device, --no-progress. A full run writes into
    `results_dir` unless --out or --no-save says otherwise; --quick writes nothing."""
    import argparse

    parser = argparse.ArgumentParser(description=description or f"benchmark {name}")
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
        out = results_dir
    if args.no_save:
        out = None
    run(name, quick=args.quick, out=out, progress=not args.no_progress, device=args.device)
    return 0


__all__ = ["run", "names", "script_main", "BENCHMARKS"]
