"""The one table of test tolerances, by storage dtype of the params.

fp32: kernels and torch differ only in rounding order (fused multiply-add, reciprocal
of sqrt(bias correction)), a few ulps per step. bf16/fp16: one rounding of the param
per step at the storage precision; the bound is the dtype's epsilon times the
parameter scale, i.e. one to two ulps, and the tests additionally require the error
against a float64 oracle to be at most 2x what torch's own optimizer makes.
"""
import torch

# dtype -> (rtol, atol) for comparing a param after a few steps
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-12, 1e-14),
    torch.bfloat16: (1.6e-2, 1e-3),
    torch.float16: (2e-3, 1e-4),
}

# the states (exp_avg, exp_avg_sq) stay fp32 in most tests; when they are stored in
# a low-precision dtype they use the same row as the params.


def tol(dtype: torch.dtype) -> dict:
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol}
