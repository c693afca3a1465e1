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


def test_check_cuda_reads_ptxas_spills():
    """tools/check_cuda.py fails a build whose shared multi-tensor kernels spill (it
    passes -warn-spills to ptxas and reads its warnings) and lists other kernels' spills."""
    from check_cuda import spilling_kernels

    out = ("ptxas warning : Registers are spilled to local memory in function "
           "'_ZN5dlopt3mta19multi_tensor_kernelI6AdamOpLi32000EEEvNS0_5TableIT_XT0_EEE', "
           "40 bytes spill stores, 40 bytes spill loads\n"
           "ptxas info    : Used 64 registers\n"
           "ptxas warning : Registers are spilled to local memory in function "
           "'_ZN5dlopt19af_direction_kernelE', 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas warning : Registers are spilled to local memory in function "
           "'_ZN5dlopt3mta26multi_tensor_reduce_kernelI4NormLi4000EEEvNS0_5TableE', 8 bytes\n")
    shared, other = spilling_kernels(out)
    assert shared == ["_ZN5dlopt3mta19multi_tensor_kernelI6AdamOpLi32000EEEvNS0_5TableIT_XT0_EEE",
                      "_ZN5dlopt3mta26multi_tensor_reduce_kernelI4NormLi4000EEEvNS0_5TableE"]
    assert other == ["_ZN5dlopt19af_direction_kernelE"]
    assert spilling_kernels("ptxas info    : Used 64 registers, 0 bytes spill stores\n") == ([], [])
