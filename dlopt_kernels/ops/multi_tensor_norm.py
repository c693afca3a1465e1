"""`torch.ops.dlopt.multi_tensor_norm`: the vector norm of every tensor of a list, and
of all of them together, in one call (one pass over memory).

    norms, total = torch.ops.dlopt.multi_tensor_norm(tensors, norm_type=2.0)

`norms` is a 1-D float32 tensor with one entry per tensor,
`torch.linalg.vector_norm(tensors[i], norm_type)`; `total` is a 0-dim float32 tensor,
`torch.linalg.vector_norm(norms, norm_type)` (for every norm_type but 0 that is the
norm of all elements as one vector). Both live on the tensors' device; all tensors must
share one device (any mix of float32, bfloat16, float16 and float64 is fine). Nothing
waits for the device: the results stay tensors.

`norm_type`: any float, as torch.linalg.vector_norm's `ord`: 2 and 1 (sums), inf (max
|x|), -inf (min |x|), 0 (count of non-zeros), any other p (sum |x|^p)^(1/p). The
arithmetic is fp32 per element with wider accumulation (double on the CPU; fp32 per
thread, double across threads and chunks on CUDA). Unlike torch, an empty tensor is
not an error for inf / -inf / p < 0: it contributes the reduction's identity (its norm
is 0 for inf, inf for -inf and p < 0). NaN anywhere propagates into its tensor's norm
and the total, as in torch.

The maths is csrc/include/dlopt/norm_math.h (C++ CPU and CUDA); the Triton kernel and
the pure-torch reference follow it. `backend` is "auto" | "cpu" | "cuda" | "triton" |
"reference".
"""
from __future__ import annotations

import torch

from dlopt_kernels.backends.registry import resolve
from dlopt_kernels.ops._library import compiled, define

SCHEMA = ("multi_tensor_norm(Tensor[] tensors, float norm_type=2.0, str backend='auto') "
          "-> (Tensor, Tensor)")


def _impl(tensors, norm_type=2.0, backend="auto"):
    if not tensors:
        return torch.zeros(0), torch.zeros(())
    _, kernel = resolve("multi_tensor_norm", tensors[0].device, backend)
    return kernel(tensors, norm_type)


def _fake(tensors, norm_type=2.0, backend="auto"):
    if not tensors:
        return torch.empty(0), torch.empty(())
    t = tensors[0]
    return (t.new_empty((len(tensors),), dtype=torch.float32),
            t.new_empty((), dtype=torch.float32))


multi_tensor_norm = define(SCHEMA, _impl, _fake, backends={
    "cpu": compiled("multi_tensor_norm"),
    "cuda": compiled("multi_tensor_norm"),
    "triton": "dlopt_kernels.triton.multi_tensor_norm:multi_tensor_norm",
    "reference": "dlopt_kernels.backends.reference.multi_tensor_norm:multi_tensor_norm",
})
