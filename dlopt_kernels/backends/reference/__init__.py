"""Pure-torch implementations: the path for every device we have no kernel for
(MPS, XLA/TPU, ...), written with plain tensor ops so they run anywhere. Each module
follows one op's kernel maths line by line (csrc/include/dlopt/*_math.h), in fp32
whatever the storage dtype. Tests use torch.optim and float64 oracles, not these, as
the truth. Ops name their reference function in `ops._library.define(backends=...)`.
"""
from dlopt_kernels.backends.reference._common import bf16_stochastic, sr_tensor_key  # noqa: F401
from dlopt_kernels.backends.reference.multi_tensor_norm import multi_tensor_norm  # noqa: F401
from dlopt_kernels.backends.reference.optim_adafactor import adafactor_step  # noqa: F401
from dlopt_kernels.backends.reference.optim_adagrad import adagrad_step  # noqa: F401
from dlopt_kernels.backends.reference.optim_adam import adam_step  # noqa: F401
from dlopt_kernels.backends.reference.optim_lamb import lamb_step  # noqa: F401
from dlopt_kernels.backends.reference.optim_lion import lion_step  # noqa: F401
from dlopt_kernels.backends.reference.optim_rmsprop import rmsprop_step  # noqa: F401
from dlopt_kernels.backends.reference.optim_sgd import sgd_step  # noqa: F401
