"""A malformed direct call of the compiled Adam op (one grad short), on the device named
by argv[1] (cpu or cuda): it must raise RuntimeError naming grads, not crash. Used by
tools/gpu_debug.sh under cuda-gdb to get a native backtrace where it crashes."""
import sys

import torch

import dlopt_kernels  # noqa: F401  (loads the compiled libraries)

d = sys.argv[1] if len(sys.argv) > 1 else "cuda"
ps = [torch.randn(6, device=d), torch.randn(2, 3, device=d)]
gs = [torch.randn_like(ps[0])]  # one grad short


def z():
    return [torch.zeros_like(p) for p in ps]


try:
    torch.ops.dlopt_C.adam_step(ps, gs, z(), z(), [], [], [torch.zeros((), device=d) for _ in ps],
                                torch.tensor(1e-3, device=d), 0.9, 0.999, 0.0, 1e-8, False, False,
                                False, None, None, None)
except RuntimeError as exc:
    print(f"{d}: raised as it should: {str(exc).splitlines()[0]}")
    sys.exit(0)
print(f"{d}: NOT refused")
sys.exit(1)
