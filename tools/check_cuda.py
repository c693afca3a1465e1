#!/usr/bin/env python3
"""Compile-check the CUDA library's sources (no GPU and no CUDA torch needed): every
csrc/cuda/*.cu with nvcc and every csrc/cuda/*.cpp (the g++-compiled host halves) with
the C++ compiler. A .cu that includes a torch header (ATen, c10, torch) fails too: a
TORCH_CHECK built by nvcc crashed instead of raising (docs/compat.md), so everything that
checks or formats belongs in the host halves (csrc/include/dlopt/cuda_launch.h).

Compiles each file to an object in a temporary directory with the flags a torch
CUDA extension build uses, for sm_80 and sm_90 (override with DLOPT_CUDA_ARCH,
e.g. "90"). Nothing is linked: a CPU-only torch wheel has no libc10_cuda.
A .cu also fails when ptxas spills registers to local memory in the shared
multi-tensor kernels (multi_tensor_apply.cuh, multi_tensor_reduce.cuh), which every
optimizer's step runs; spills in other kernels are listed, not failed.
Files compile in parallel. Prints one line per file with the seconds taken;
exits 1 with the compiler's output if any file fails, and 0 with a message if nvcc
is not installed.

    python tools/check_cuda.py [file.cu|file.cpp ...]
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_include(nvcc: str) -> str | None:
    """The toolkit's include directory (cuda_runtime_api.h), which the C++ compiler needs
    for the host halves; nvcc may be a wrapper script outside the toolkit."""
    homes = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
             os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    return None


def common_flags() -> list[str]:
    """Defines and include paths both compilers get."""
    import torch
    from torch.utils import cpp_extension

    flags = ["-c", "-O3", "-std=c++17",
             "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",  # header missing from CPU wheels
             "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             "-I" + os.path.join(ROOT, "csrc", "include"),
             "-I" + sysconfig.get_paths()["include"]]
    return flags + ["-I" + p for p in cpp_extension.include_paths()]


def nvcc_flags(threads: int) -> list[str]:
    from torch.utils import cpp_extension

    archs = os.environ.get("DLOPT_CUDA_ARCH", "80;90").split(";")
    # What BuildExtension adds for a CUDAExtension (half/bf16 operators off, ...).
    common = getattr(cpp_extension, "COMMON_NVCC_FLAGS", ["--expt-relaxed-constexpr"])
    flags = [*common_flags(), "--expt-relaxed-constexpr", *common,
             "--fmad=false",  # as setup.py's NVCC_FP
             "-Xptxas=-warn-spills",  # a warning each (spilling_kernels reads them)
             "-Xcompiler", "-fPIC", f"--threads={threads}"]
    flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a.strip()]
    return list(dict.fromkeys(flags))  # drop duplicates, keep order


def cxx_flags(cuda_inc: str) -> list[str]:
    # setup.py's "cxx" flags for the CUDA extension, plus the toolkit headers that
    # CUDAExtension adds (c10/cuda includes cuda_runtime_api.h).
    return list(dict.fromkeys([*common_flags(), "-fPIC", "-I" + cuda_inc]))


def main() -> int:
    nvcc = find_nvcc()
    if nvcc is None:
        print("check_cuda: nvcc not found; skipping the CUDA compile check")
        return 0
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    files = sys.argv[1:] or (sorted(glob.glob(os.path.join(cuda_dir, "*.cu")))
                             + sorted(glob.glob(os.path.join(cuda_dir, "*.cpp"))))
    if not files:
        print("check_cuda: no CUDA sources")
        return 0
    cuda_inc = cuda_include(nvcc)
    if cuda_inc is None and any(f.endswith(".cpp") for f in files):
        print(f"check_cuda: no cuda_runtime_api.h beside {nvcc}; set CUDA_HOME")
        return 1
    cpus = os.cpu_count() or 1
    workers = min(len(files), cpus)
    # nvcc --threads compiles the gencode targets of one file in parallel.
    compilers = {".cu": [nvcc, *nvcc_flags(threads=cpus)]}
    if cuda_inc is not None:
        compilers[".cpp"] = [os.environ.get("CXX", "c++"), *cxx_flags(cuda_inc)]

    with tempfile.TemporaryDirectory(prefix="dlopt_check_cuda_") as out:
        def compile_one(src: str):
            obj = os.path.join(out, os.path.basename(src) + ".o")
            cmd = [*compilers[os.path.splitext(src)[1]], src, "-o", obj]
            if src.endswith(".cu"):
                cmd += ["-MD", "-MF", obj + ".d"]  # the headers it read, for torch_headers()
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True)
            secs = time.perf_counter() - t0
            error = res.stdout + res.stderr if res.returncode != 0 else ""
            notes = ""
            if not error and src.endswith(".cu"):
                shared, other = spilling_kernels(res.stderr)
                if shared:
                    error = (f"registers spilled to local memory in {len(shared)} multi-tensor "
                             f"kernels, e.g. {shared[0]}\n")
                notes = "".join(f"  note: spills in {k}\n" for k in sorted(set(other)))
            if not error and src.endswith(".cu"):
                found = torch_headers(obj + ".d")
                if found:
                    error = (f"{len(found)} torch headers reach nvcc, e.g. {found[0]}; move what "
                             "needs them into the host half (a .cpp)\n")
            return src, error, notes, secs

        failed = 0
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for src, error, notes, secs in pool.map(compile_one, files):
                rel = os.path.relpath(src, ROOT)
                status = "FAILED" if error else "ok"
                print(f"check_cuda: {rel}: {status} ({secs:.1f} s)", flush=True)
                sys.stdout.write(notes)
                if error:
                    failed += 1
                    sys.stdout.write(error)
    return 1 if failed else 0


# ptxas -warn-spills: "Registers are spilled to local memory in function 'NAME', ..."
_SPILL = re.compile(r"spilled to local memory in function '([^']+)'")
_SHARED_KERNELS = ("multi_tensor_kernel", "multi_tensor_reduce_kernel")


def spilling_kernels(ptxas_output: str) -> tuple[list[str], list[str]]:
    """The (mangled) kernels ptxas reported spilling: (the shared multi-tensor kernels,
    the others)."""
    names = _SPILL.findall(ptxas_output)
    shared = [n for n in names if any(k in n for k in _SHARED_KERNELS)]
    return shared, [n for n in names if n not in shared]


def torch_headers(depfile: str) -> list[str]:
    """The torch headers (ATen, c10, torch) in a make-style dependency file."""
    import torch

    root = os.path.join(os.path.realpath(os.path.dirname(torch.__file__)), "include") + os.sep
    with open(depfile) as f:
        deps = f.read().replace("\\\n", " ").split()
    return [d for d in deps if os.path.realpath(d).startswith(root)]


if __name__ == "__main__":
    sys.exit(main())
