"""`torch.ops.dlopt.adafactor_step`: the multi-tensor Adafactor step, with
torch.optim.Adafactor's maths (see csrc/include/dlopt/adafactor_math.h; Shazeer & Stern
2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost").

Lists: `params`, `grads`, `master_params` (fp32 master weights; empty for none) and
`state_steps` have one entry per param. The second-moment states follow torch's layout:
`row_vars` and `col_vars` have one entry per param of 2 or more dims (the param's shape
with dim -1, resp. dim -2, set to 1), `variances` one per param of 0 or 1 dims (the
param's shape), each in param order. The op mutates params, the states, master_params
and state_steps (each incremented by one, unless `found_inf` is non-zero: then nothing
at all changes). A zero-size param only has its step counted.

One op call runs the whole list: the kernels compute the per-row / per-column means of
g^2, the per-tensor RMS of the param and of the update in the same call (three passes
over each tensor, no Python loop on the CPU backend).

float64 params (in a call of their own, with float64 states and no master weights) are
computed in double by the cpu and reference kernels; the GPU kernels are fp32.

`lr` is a 0-dim tensor; `eps1` is a float (the optimizer resolves torch's None to the
param dtype's machine epsilon). `grad_scale` divides the grads (GradScaler), `sr_seed`
(an int64 0-dim tensor, or None) turns on stochastic rounding of bf16 params.

The cuda and triton kernels add their sums with fp64 atomics, so on a GPU the last bits
of a step may vary run to run; under ``torch.use_deterministic_algorithms(True)``
``backend='auto'`` runs the (deterministic) reference kernels there, and an explicit
cuda or triton backend is refused (warned about under ``warn_only=True``).
"""
from __future__ import annotations

from dlopt_kernels.ops._library import compiled, define_step

SCHEMA = (
    "adafactor_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] row_vars, "
    "Tensor(c!)[] col_vars, Tensor(d!)[] variances, Tensor(e!)[] master_params, "
    "Tensor(f!)[] state_steps, Tensor lr, float beta2_decay, float eps1, float eps2, float d, "
    "float weight_decay, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
    "Tensor? sr_seed, str backend='auto') -> ()")

# The GPU kernels add the row / column sums and the p^2 / u^2 sums with fp64 atomics,
# in whatever order the blocks run.
_ATOMICS = "it adds its row, column and norm sums with fp64 atomics, in a varying order"

adafactor_step = define_step(SCHEMA, complex_params=False, float64_backends=("cpu",), backends={
    "cpu": compiled("adafactor_step"),
    "cuda": compiled("adafactor_step"),
    "triton": "dlopt_kernels.triton.optim_adafactor:adafactor_step",
    "reference": "dlopt_kernels.backends.reference.optim_adafactor:adafactor_step",
}, nondeterministic={"cuda": _ATOMICS, "triton": _ATOMICS})
