"""Public ops, `torch.ops.dlopt.*`, declared in Python with torch.library so the
contract (schema, fake for torch.compile) exists even when nothing is compiled."""
from dlopt_kernels.ops.optim_adam import adam_step

__all__ = ["adam_step"]
