#!/usr/bin/env python3
"""Compile every Triton kernel launch the tests make, for a real GPU, on a machine
without one.

The CPU tests run the Triton kernels through the interpreter (TRITON_INTERPRET=1),
which executes the kernel's Python with numpy and never runs Triton's compiler. Code
the interpreter accepts can still fail to compile: the first GPU run (H200,
benchmarks/results/nvidia-h200-2026-11-26-notes.md) found Adafactor kernels that did
not compile once Triton turned an int argument equal to 1 into a constant. This tool
closes that gap without a GPU:

1. record: with DLOPT_TRITON_LAUNCH_LOG=FILE set, tests/conftest.py makes every
   interpreted launch append one JSON line to FILE: the kernel's module and name and,
   per argument, what Triton specializes on (a tensor's dtype and 16-byte alignment,
   an int's value, a float, a constexpr's value).
2. compile: this tool rebuilds each launch's arguments as CPU tensors with the same
   dtype and alignment, and calls the kernel's `warmup`, which runs Triton's whole
   pipeline (TTIR, TTGIR, LLVM IR, PTX, and ptxas to a cubin) for the target GPU
   through a stand-in driver that only names that target. Triton keys its kernel
   cache on the same specialization as a real launch, so a launch that would reuse a
   compiled kernel on the GPU is not compiled twice here either.

It also fails when a kernel specialization launched with ALIGNED=True (16-byte aligned
tensors, numel a multiple of 8: `_common.vector_ready`) has no vector loads in its PTX.

What it cannot check: anything at run time (numerics, bit-equality between
specializations, out-of-bounds accesses). Those need the GPU run (tools/gpu_check.sh).

    python tools/check_triton.py                 # run the Triton tests, then compile
    python tools/check_triton.py --log FILE      # compile the launches FILE recorded
    python tools/check_triton.py --arch 90 --arch 80 --jobs 2

Exits 1 and prints Triton's error for each failing kernel specialization.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_ENV = "DLOPT_TRITON_LAUNCH_LOG"


# ------------------------------------------------------------------ recording side


def _encode(v):
    """What Triton's specialization sees of a launch argument, as JSON."""
    import torch
    import triton.language as tl

    if isinstance(v, torch.Tensor):
        # Triton adds a divisibility-by-16 attribute to aligned pointers.
        return {"tensor": str(v.dtype).removeprefix("torch."), "aligned": v.data_ptr() % 16 == 0}
    if v is None or isinstance(v, (bool, int, float, str)):
        return {"value": v}
    if isinstance(v, tl.dtype):
        return {"tl_dtype": v.name}
    raise TypeError(f"check_triton cannot record a launch argument of type {type(v).__name__}")


def record_launches(path: str) -> None:
    """Make every interpreted launch append a line to `path` (called by
    tests/conftest.py when DLOPT_TRITON_LAUNCH_LOG is set) and then run as usual."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        line = json.dumps({"module": self.fn.__module__, "name": self.fn.__qualname__,
                           "args": [_encode(a) for a in args],
                           "kwargs": {k: _encode(v) for k, v in kwargs.items()}},
                          sort_keys=True)
        with open(path, "a") as f:
            f.write(line + "\n")
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


# ------------------------------------------------------------------- compiling side


def _install_target_driver(arch: int):
    """Point Triton's active driver at a stand-in that names sm_<arch> and device 0:
    compiling needs only the target, never a GPU."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime.driver import driver

    class TargetOnlyDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            return CudaDriver.map_python_to_cpp_type(self, ty)

    driver.set_active(TargetOnlyDriver())


def _decode(e):
    import torch
    import triton.language as tl

    if "tensor" in e:
        dtype = getattr(torch, e["tensor"])
        base = torch.zeros(64, dtype=dtype)  # CPU allocations are 64-byte aligned
        return base if e["aligned"] else base[1:]
    if "tl_dtype" in e:
        return tl.dtype(e["tl_dtype"])
    return e["value"]


def _kernel(module: str, name: str):
    import importlib

    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _compile_group(arch: int, lines: list[str]):
    """Compile one group of launch lines for sm_<arch> in this process; returns
    ({kernel label: specializations compiled}, [failure reports],
    {(kernel label, ALIGNED): [vector loads in each specialization's PTX]})."""
    # Real JIT functions: this must hold before any @triton.jit function is defined.
    os.environ["TRITON_INTERPRET"] = "0"
    _install_target_driver(arch)
    per_kernel, failures, seen = collections.Counter(), [], set()
    vectors = collections.defaultdict(list)
    for line in lines:
        rec = json.loads(line)
        fn = _kernel(rec["module"], rec["name"])
        label = f"{rec['module'].rsplit('.', 1)[-1]}.{rec['name']}"
        args = [_decode(a) for a in rec["args"]]
        kwargs = {k: _decode(v) for k, v in rec["kwargs"].items()}
        before = sum(len(c[0]) for c in fn.device_caches.values())
        try:
            compiled = fn.warmup(*args, grid=(1,), **kwargs)
        except Exception as exc:  # noqa: BLE001 (report every kind, then fail)
            key = (label, type(exc).__name__, str(exc)[:200])
            if key not in seen:  # one report per distinct error of a kernel
                seen.add(key)
                failures.append(f"FAILED sm_{arch} {label}\n  launch: {line}\n  "
                                f"{type(exc).__name__}: {str(exc).strip()[:3000]}\n")
            continue
        # Triton's cache skips a launch whose specialization was compiled already
        new = sum(len(c[0]) for c in fn.device_caches.values()) - before
        per_kernel[label] += new
        if new and "ALIGNED" in kwargs:
            vectors[(label, kwargs["ALIGNED"])].append(
                compiled.asm["ptx"].count("ld.global.v"))
    return per_kernel, failures, vectors


def compile_launches(log: str, arches: list[int], jobs: int) -> int:
    """Compile each distinct launch in `log` for every arch, each kernel's launches in
    one of `jobs` processes; returns the number of failures (each printed)."""
    with open(log) as f:
        launches = sorted(set(f.read().splitlines()))
    by_kernel = collections.defaultdict(list)
    for line in launches:
        rec = json.loads(line)
        by_kernel[(rec["module"], rec["name"])].append(line)
    # a kernel's launches stay in one process, so its cache sees them all; the biggest
    # kernels first, each to the least loaded process
    buckets = [[] for _ in range(max(1, jobs))]
    for lines in sorted(by_kernel.values(), key=len, reverse=True):
        min(buckets, key=len).extend(lines)
    failures = 0
    # A fresh kernel cache: a hit in ~/.triton/cache would skip the compiler this checks.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="dlopt_triton_cache_")
    ctx = multiprocessing.get_context("spawn")
    for arch in arches:
        t0 = time.time()
        per_kernel = collections.Counter()
        vectors = collections.defaultdict(list)
        with ProcessPoolExecutor(len(buckets), mp_context=ctx) as pool:
            for counts, reports, vecs in pool.map(_compile_group, [arch] * len(buckets),
                                                  buckets):
                per_kernel.update(counts)
                for k, v in vecs.items():
                    vectors[k] += v
                for r in reports:
                    print(r, flush=True)
                failures += len(reports)
        print(f"sm_{arch}: {len(launches)} distinct launches recorded, "
              f"{sum(per_kernel.values())} kernel specializations compiled to cubin in "
              f"{time.time() - t0:.0f} s ({len(buckets)} processes)", flush=True)
        for label, n in sorted(per_kernel.items()):
            print(f"  {label}: {n}")
        # launch_multi_tensor's ALIGNED specializations must move 16-byte vectors (the
        # point of ALIGNED); one that does not fails the check
        for (label, aligned), loads in sorted(vectors.items()):
            print(f"  vector loads, {label} ALIGNED={aligned}: in {sum(v > 0 for v in loads)} "
                  f"of {len(loads)} specializations")
            if aligned and not all(loads):
                print(f"FAILED sm_{arch} {label}: an ALIGNED specialization without vector loads")
                failures += 1
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", help="a launch log written by a test run with "
                    f"{LOG_ENV}=FILE (default: run the Triton tests now to write one)")
    ap.add_argument("--arch", type=int, action="append",
                    help="compute capability to compile for, e.g. 90 (repeatable; default 90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="compiling processes (default: one per CPU)")
    opts = ap.parse_args()
    arches = opts.arch or [90]
    log = opts.log
    if log is None:
        log = os.path.join(tempfile.mkdtemp(prefix="dlopt_triton_"), "launches.jsonl")
        # the interpreter then runs the kernels with a GPU's block sizes and warps
        env = dict(os.environ, **{LOG_ENV: log, "DLOPT_TRITON_GPU_SIZES": "1"})
        cmd = [sys.executable, "-m", "pytest", os.path.join(ROOT, "tests"), "-q", "-k", "triton",
               "-p", "no:cacheprovider"]
        print("recording launches:", " ".join(cmd), flush=True)
        if subprocess.call(cmd, env=env, cwd=ROOT) != 0:
            print("the Triton tests failed; compiling what they launched anyway", flush=True)
    if not os.path.isfile(log):
        print(f"no launch log at {log}: did the run set {LOG_ENV} and launch any Triton kernel?")
        return 1
    failures = compile_launches(log, arches, opts.jobs)
    print("all compiled" if not failures else f"{failures} kernel specialization(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
