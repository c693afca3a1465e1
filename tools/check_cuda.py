#!/usr/bin/env python3
"""Compile-check every csrc/cuda/*.cu with nvcc (no GPU and no CUDA torch needed).

Compiles each file to an object in a temporary directory with the flags a torch
CUDA extension build uses, for sm_80 and sm_90 (override with DLOPT_CUDA_ARCH,
e.g. "90"). Nothing is linked: a CPU-only torch wheel has no libc10_cuda.
Files compile in parallel. Prints one line per file with the seconds taken;
exits 1 with nvcc's output if any file fails, and 0 with a message if nvcc is
not installed.

    python tools/check_cuda.py [file.cu ...]
"""
from __future__ import annotations

import glob
import os
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


def nvcc_flags(threads: int) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    archs = os.environ.get("DLOPT_CUDA_ARCH", "80;90").split(";")
    # What BuildExtension adds for a CUDAExtension (half/bf16 operators off, ...).
    common = getattr(cpp_extension, "COMMON_NVCC_FLAGS", ["--expt-relaxed-constexpr"])
    flags = ["-c", "-O3", "-std=c++17", "--expt-relaxed-constexpr", *common,
             "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",  # header missing from CPU wheels
             "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             "-Xcompiler", "-fPIC", f"--threads={threads}",
             "-I" + os.path.join(ROOT, "csrc", "include"),
             "-I" + sysconfig.get_paths()["include"]]
    flags += ["-I" + p for p in cpp_extension.include_paths()]
    flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a.strip()]
    return list(dict.fromkeys(flags))  # drop duplicates, keep order


def main() -> int:
    nvcc = find_nvcc()
    if nvcc is None:
        print("check_cuda: nvcc not found; skipping the CUDA compile check")
        return 0
    files = sys.argv[1:] or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not files:
        print("check_cuda: no .cu files")
        return 0
    cpus = os.cpu_count() or 1
    workers = min(len(files), cpus)
    # nvcc --threads compiles the gencode targets of one file in parallel.
    flags = nvcc_flags(threads=cpus)

    with tempfile.TemporaryDirectory(prefix="dlopt_check_cuda_") as out:
        def compile_one(src: str):
            obj = os.path.join(out, os.path.basename(src) + ".o")
            t0 = time.perf_counter()
            res = subprocess.run([nvcc, *flags, src, "-o", obj], capture_output=True, text=True)
            return src, res, time.perf_counter() - t0

        failed = 0
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for src, res, secs in pool.map(compile_one, files):
                rel = os.path.relpath(src, ROOT)
                status = "ok" if res.returncode == 0 else "FAILED"
                print(f"check_cuda: {rel}: {status} ({secs:.1f} s)", flush=True)
                if res.returncode != 0:
                    failed += 1
                    sys.stdout.write(res.stdout + res.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
