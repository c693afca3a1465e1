"""Build the compiled kernels: dlopt_kernels._C (C++ CPU, always) and, where a CUDA
toolkit and a CUDA build of torch exist, dlopt_kernels._C_cuda.

Environment:
  DLOPT_BUILD_CUDA  auto (default) | 1 (force, fail if impossible) | 0 (never)
  DLOPT_CPU_ARCH    -march value for the CPU kernels (default: native; e.g. x86-64-v3)
  DLOPT_CUDA_ARCH   SM list for nvcc, e.g. "80;90" (default: 80;90)
"""
import glob
import os
import platform
import shutil

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(ROOT, "csrc", "include")


def want_cuda() -> bool:
    # Decide from the toolkit and torch's build, never from torch.cuda.is_available():
    # a GPU build host may have no GPU.
    flag = os.environ.get("DLOPT_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    nvcc = shutil.which("nvcc") or (
        cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    possible = bool(__import__("torch").version.cuda) and bool(nvcc)
    if flag in ("1", "true", "yes", "on") and not possible:
        raise RuntimeError("DLOPT_BUILD_CUDA=1 but torch has no CUDA build or nvcc is missing")
    return possible


def shared_libstdcxx() -> list:
    """Link arguments that make the extensions use the shared libstdc++ the process runs
    with (torch's). One GPU image's compiler (CXX=/opt/gcc/bin/g++, GCC 13.3) had only
    libstdc++.a in its search path and linked it statically into our libraries; that
    private copy's locale was never set up, so the first number formatted into an error
    message (any refused call) segfaulted. A full path to the shared library, placed
    before the driver's own -lstdc++, satisfies every reference first, so an archive
    after it adds nothing. The library: the one this build process has loaded (torch is
    imported, so it is the runtime's), else the compiler's; none: the default link."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libstdc++.so" in path and os.path.exists(path):
                    return [path]
    except OSError:
        pass
    import subprocess
    cxx = os.environ.get("CXX", "g++").split()[0]
    try:
        path = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    return [os.path.realpath(path)] if os.path.isabs(path) and os.path.exists(path) else []


# -ffp-contract=off: g++ fuses `a + b * c` into one FMA by default, even under -std=c++17
# (ISO mode turns contraction off for C only), which nvcc (--fmad=false below) and Triton
# (enable_fp_fusion=False) do not: Adam's m + (1 - beta1) * (g - m) came out one ulp
# apart on the CPU and on CUDA (tests/test_cuda_launch_emulation.py found it). The
# maths headers write every FMA they want (`fmadd`), which stays fused.
cxx_flags = ["-O3", "-std=c++17", f"-march={os.environ.get('DLOPT_CPU_ARCH', 'native')}",
             "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # gcc's -march=native keeps 256-bit vectors even where AVX-512 exists. The step
    # loops carry a sqrt and a divide per element, and with 512-bit vectors they kept
    # up with memory where 256-bit ones did not (bf16 SR Adam, Adagrad): the CPU
    # rows of benchmarks/results/ are measured with this flag. No effect without AVX-512.
    cxx_flags.append("-mprefer-vector-width=512")
use_cuda = want_cuda()
LINK_STDCXX = shared_libstdcxx()
# No implicit FMA contraction in CUDA code (nvcc contracts a*b + c by default): which
# pairs it fused differed between the vector and the scalar loop of multi_tensor_apply,
# so an element's result depended on its tensor's alignment (an H100 run, RMSprop and
# LAMB on views at odd offsets). The maths headers name each FMA they want (`fmadd`);
# the C++ CPU build (-ffp-contract=off, above) and Triton (enable_fp_fusion=False) do the
# same. The kernels are memory-bound: on that H100, CUDA Adam on the GPT-2 list ran at
# 1.27x torch fused with this flag and 1.22x without (two runs, within their spread:
# benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-26-notes.md).
NVCC_FP = ["--fmad=false"]
archs = os.environ.get("DLOPT_CUDA_ARCH", "80;90").split(";")
if use_cuda:  # lets `dlopt-kernels info` say what the CUDA library was built for
    cxx_flags += ["-DDLOPT_WITH_CUDA", f'-DDLOPT_CUDA_ARCH_STR="{";".join(archs)}"']
cpu_sources = (["csrc/registration.cpp", "csrc/python_fast_path.cpp", "csrc/python_lists.cpp"]
               + sorted(glob.glob("csrc/cpu/*.cpp")))
cpu_sources += ["csrc/common/tensor_lists.cpp"]  # list checks, shared with the CUDA library
ext_modules = [
    cpp_extension.CppExtension(
        "dlopt_kernels._C", cpu_sources, include_dirs=[INCLUDE],
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"] + LINK_STDCXX)
]

if use_cuda:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # Kernel arguments over 4 KB (multi_tensor_apply's 32 KB tables) need sm_70+: an
    # older architecture in the list builds the 4 KB tables only.
    if min(int("".join(c for c in a if c.isdigit()) or 0) for a in archs) < 70:
        gencode.append("-DDLOPT_NO_LARGE_ARGS")
    # Kernels and launchers (.cu, nvcc) and the host halves that check arguments and
    # raise errors (.cpp, g++): no TORCH_CHECK is built by nvcc (docs/compat.md).
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    ext_modules.append(cpp_extension.CUDAExtension(
        "dlopt_kernels._C_cuda", cuda_sources, include_dirs=[INCLUDE],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "-DNDEBUG", "--expt-relaxed-constexpr",
                                     "-lineinfo", *NVCC_FP] + gencode},
        extra_link_args=LINK_STDCXX))

setup(ext_modules=ext_modules, cmdclass={"build_ext": cpp_extension.BuildExtension})
