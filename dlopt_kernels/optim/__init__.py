"""Drop-in torch.optim optimizers whose step is one fused multi-tensor kernel."""
from dlopt_kernels.optim.adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]
