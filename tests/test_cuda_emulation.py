"""The CUDA multi-tensor apply's table packing and per-thread indexing, run on the CPU
(tests/cuda_emulation/mta_emulation.cu, built by nvcc as a host-only program): the
CUDA tests need a GPU, but this part of every CUDA optimizer launch does not."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from check_cuda import find_nvcc  # noqa: E402

NVCC = find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit), not a GPU")
def test_multi_tensor_apply_emulated(tmp_path):
    exe = str(tmp_path / "mta_emulation")
    src = os.path.join(ROOT, "tests", "cuda_emulation", "mta_emulation.cu")
    subprocess.run([NVCC, "-std=c++17", "-O1", "--expt-relaxed-constexpr", "-arch=sm_90",
                    "-I" + os.path.join(ROOT, "csrc", "include"), "-o", exe, src], check=True)
    out = subprocess.run([exe], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
