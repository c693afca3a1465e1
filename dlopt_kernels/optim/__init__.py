"""Drop-in torch.optim optimizers whose step is one fused multi-tensor kernel."""
from dlopt_kernels.optim.adafactor import Adafactor
from dlopt_kernels.optim.adagrad import Adagrad
from dlopt_kernels.optim.adam import Adam, AdamW
from dlopt_kernels.optim.clip_grad import clip_grad_norm_, get_total_norm
from dlopt_kernels.optim.lamb import LAMB
from dlopt_kernels.optim.lion import Lion
from dlopt_kernels.optim.rmsprop import RMSprop
from dlopt_kernels.optim.sgd import SGD

__all__ = ["Adafactor", "Adagrad", "Adam", "AdamW", "clip_grad_norm_", "get_total_norm", "LAMB",
           "RMSprop", "SGD", "Lion"]
