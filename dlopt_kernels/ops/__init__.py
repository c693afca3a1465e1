"""Public ops, `torch.ops.dlopt.*`, declared in Python with torch.library so the
contract (schema, fake for torch.compile) exists even when nothing is compiled."""
from dlopt_kernels.ops.multi_tensor_norm import multi_tensor_norm
from dlopt_kernels.ops.optim_adafactor import adafactor_step
from dlopt_kernels.ops.optim_adagrad import adagrad_step
from dlopt_kernels.ops.optim_adam import adam_step
from dlopt_kernels.ops.optim_lamb import lamb_step
from dlopt_kernels.ops.optim_lion import lion_step
from dlopt_kernels.ops.optim_rmsprop import rmsprop_step
from dlopt_kernels.ops.optim_sgd import sgd_step
from dlopt_kernels.ops._dtensor import register_dtensor_rules, register_if_loaded

register_if_loaded()  # DTensor rules, if torch.distributed.tensor is already imported

__all__ = ["multi_tensor_norm", "adagrad_step", "adam_step", "lamb_step", "lion_step",
           "adafactor_step", "rmsprop_step", "sgd_step", "register_dtensor_rules"]
