"""The `dlopt-kernels` command.

    dlopt-kernels info                      what was compiled, what each op will run on
    dlopt-kernels bench NAME [--quick] [--out PATH]
    dlopt-kernels demo [--steps N] [--device cpu|cuda] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
from typing import Optional, Sequence

import torch


# -- info --------------------------------------------------------------------------------
def _triton_version() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        try:
            import triton

            return getattr(triton, "__version__", "unknown version")
        except Exception as exc:  # a broken install
            return f"installed but not importable ({type(exc).__name__}: {exc})"


def _known_ops() -> list[str]:
    from dlopt_kernels.backends import registry

    return sorted({op for op, _ in registry._KERNELS}) or ["adam_step"]


def info_lines(problems: Optional[list] = None) -> list[str]:
    """What `dlopt-kernels info` prints, one line per item. Ops that cannot run with
    backend='auto' here (a bad DLOPT_BACKEND) are appended to `problems`."""
    import dlopt_kernels
    from dlopt_kernels import _lib
    from dlopt_kernels.backends import registry

    lines: list[str] = []
    problems = [] if problems is None else problems
    add = lines.append
    add(f"dlopt_kernels {dlopt_kernels.__version__}  ({os.path.dirname(dlopt_kernels.__file__)})")
    add(f"python {platform.python_version()}  ({sys.executable})")
    add(f"torch {torch.__version__}  (CUDA {torch.version.cuda or 'none'}; "
        f"{torch.get_num_threads()} CPU threads)")
    tv = _triton_version()
    add(f"triton {tv if tv else 'not installed'}"
        + ("  (TRITON_INTERPRET=1: Triton kernels run on the CPU through the interpreter)"
           if registry.triton_interpreted() else ""))
    add(f"platform {platform.platform()}; {platform.machine()}")

    add("")
    add("compiled:")
    info = _lib.build_info()
    if _lib.LOADED.get("cpu"):
        add(f"  C++ CPU library: loaded, built for {info.get('cpu_isa', 'unknown ISA')}")
    else:
        add("  C++ CPU library: NOT loaded")
    if info.get("cuda") == "1":
        state = "loaded" if _lib.LOADED.get("cuda") else "NOT loaded"
        add(f"  CUDA library:    yes, arch {info.get('cuda_arch', 'unknown')} ({state})")
    else:
        add("  CUDA library:    no")
    add(f"  Triton kernels:  {('triton ' + tv) if tv else 'not installed (pip install triton)'}")
    if _lib.LOAD_ERRORS:
        add("")
        add("load errors:")
        for key, err in sorted(_lib.LOAD_ERRORS.items()):
            add(f"  {key}: {err}")

    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    add("")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        add(f"devices: cpu, cuda ({names})")
    else:
        add("devices: cpu (torch.cuda.is_available() is False)")
    env = os.environ.get("DLOPT_BACKEND")
    if env and env != "auto":
        add(f"DLOPT_BACKEND={env!r}: backend='auto' means {env!r}")
    else:
        add("DLOPT_BACKEND not set: backend='auto' picks the fastest available backend")
    add("")
    add("ops:")
    for op in _known_ops():
        add(f"  {op}  (torch.ops.dlopt.{op})")
        for dt in device_types:
            try:
                chosen = registry.resolve(op, torch.device(dt), "auto")[0]
            except Exception as exc:  # a bad or unmeetable DLOPT_BACKEND
                chosen = f"ERROR: {exc}"
                problems.append(f"{op} on {dt}: {exc}")
            avail = [b for b in registry.BACKENDS
                     if registry.why_unavailable(b, dt) is None and (op, b) in registry._KERNELS]
            add(f"    {dt} tensors: auto -> {chosen}")
            if not chosen.startswith("ERROR"):
                wide = registry.resolve(op, torch.device(dt), "auto", torch.float64,
                                        quiet=True)[0]
                if wide != chosen:
                    add(f"      float64 params: auto -> {wide} (in float64)")
            add(f"      available: {', '.join(avail) or 'none'}")
            atomic = [b for b in avail if registry.why_nondeterministic(op, b, dt)]
            if atomic:
                add(f"      not deterministic here: {', '.join(atomic)} "
                    f"(torch.use_deterministic_algorithms(True): auto passes over them)")
            for b in registry.BACKENDS:
                if b not in avail:
                    why = registry.why_unavailable(b, dt) or f"op {op!r} has no {b} kernel"
                    add(f"      not {b}: {why}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    """Exit code 1 when an op cannot run with backend='auto' (a bad DLOPT_BACKEND)."""
    problems: list[str] = []
    print("\n".join(info_lines(problems)))
    return 1 if problems else 0


# -- bench -------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from dlopt_kernels import bench
    except ImportError as exc:
        print(f"error: the benchmark module is not available ({exc})", file=sys.stderr)
        return 2
    kwargs = {"device": args.device} if args.device else {}
    try:
        result = bench.run(args.name, quick=args.quick, out=args.out,
                           progress=not args.no_progress, **kwargs)
    except (KeyError, ValueError) as exc:  # an unknown benchmark name, bad options
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    if args.out and not (isinstance(result, dict) and "json_path" in result):
        print(f"results written to {args.out}")  # bench.run says where, when it does
    return 0


# -- demo --------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from dlopt_kernels import demo

    return demo.run_from_args(args)


# -- entry point -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from dlopt_kernels import demo

    p = argparse.ArgumentParser(prog="dlopt-kernels",
                                description="dlopt_kernels: fused optimizer kernels for PyTorch")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("info", help="versions, what was compiled, which backend each op uses")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("bench", help="run a benchmark (dlopt_kernels.bench)")
    s.add_argument("name", help="benchmark name, e.g. adam or adamw")
    s.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    s.add_argument("--out", default=None,
                   help="merge the results into this .json file, or into "
                        "<folder>/<device>-<date>.json for a folder (e.g. benchmarks/results)")
    s.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    s.add_argument("--json", action="store_true", help="also print the results as JSON")
    s.add_argument("--no-progress", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("demo", help="train a small model with torch's AdamW and ours side by side",
                       description=demo.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(s)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
