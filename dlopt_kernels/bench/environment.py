"""Where a benchmark ran: the device, CPU, versions, build, git commit, command and
`DLOPT_*` settings, stored with every results section (`environment`), and the device
slug that names a results file (`device_slug`)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _slug(text: str) -> str:
    text = re.sub(r"\((R|TM|tm|r)\)", "", text)
    text = re.sub(r"@.*$", "", text)
    text = re.sub(r"\b(CPU|Processor|[0-9]+-Core)\b", "", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_slug(device: torch.device) -> str:
    """'cpu-<model>-<N>c' for the CPU, the GPU name (e.g. 'nvidia-h100-80gb-hbm3') for CUDA."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return f"cpu-{_slug(cpu_model())}-{_cpu_count()}c"


def _version(pkg: str) -> Optional[str]:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_info() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it. DLOPT_GIT_COMMIT,
    if set, names the commit instead: a GPU lease's copy of .git was seen to be an older
    snapshot than the tree it came with, so tools/gpu_check.sh passes the commit sent."""
    named = os.environ.get("DLOPT_GIT_COMMIT")
    if named:
        return {"commit": named, "dirty": None, "source": "DLOPT_GIT_COMMIT"}
    root = Path(__file__).resolve().parents[2]
    info: dict[str, Any] = {"commit": None, "dirty": None}
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True,  # noqa: E731
                                        text=True, timeout=10, check=True).stdout.strip()
        info["commit"] = run("rev-parse", "HEAD")
        # results/ itself is left out: a run of several benchmarks rewrites it between them
        info["dirty"] = bool(run("status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)benchmarks/results"))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _loadavg() -> Optional[list[float]]:
    """1/5/15-minute load averages: other work on the machine skews every number."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def command_line() -> str:
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join(argv)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": device_slug(device),
        "device_type": device.type,
        "cpu_model": cpu_model(),
        "cpu_cores": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "dlopt_kernels": _version("dlopt_kernels"),
        "command": command_line(),
        "cwd": os.getcwd(),
        "git": git_info(),
        "load_average": _loadavg(),
        # settings that change what runs (launch sizes, A/B switches)
        "dlopt_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("DLOPT_")},
    }
    try:
        from dlopt_kernels import _lib
        env["dlopt_build"] = _lib.build_info()
        env["dlopt_load_errors"] = dict(_lib.LOAD_ERRORS)
    except Exception as exc:  # noqa: BLE001
        env["dlopt_build"] = f"unavailable: {exc}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"device_name": props.name,
                    "gpu_capability": f"{props.major}.{props.minor}",
                    "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "gpu_sms": props.multi_processor_count,
                    "cuda": torch.version.cuda})
    else:
        env["device_name"] = env["cpu_model"]
    return env
