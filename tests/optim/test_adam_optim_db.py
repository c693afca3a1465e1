"""PyTorch's own optimizer test database (torch.testing._internal.common_optimizers
.optim_db) run against ours: every constructor-argument combination torch's tests try
for Adam and AdamW (optim_inputs_func for device "cpu" and "cuda", each with the
global "cliquey" flags foreach / fused / differentiable switched on one at a time)
either trains step by step like torch, or is refused with a clear ValueError /
TypeError. The refusals are few and listed in docs/compat.md. torch's error inputs
(optim_error_inputs_func) must raise here too.
"""
from __future__ import annotations

import pytest
import torch

from optim_twin_helpers import (assert_refusals_documented, check_optim_db_error_input,
                                optim_db_configs, optim_db_dtypes, optim_db_error_inputs,
                                run_optim_db_config)

from dlopt_kernels.optim import Adam, AdamW

CLASSES = {"Adam": (Adam, torch.optim.Adam), "AdamW": (AdamW, torch.optim.AdamW)}

# Configs ours refuses, and why (docs/compat.md says the same).
REFUSED = {
    "differentiable": "a fused in-place step has no autograd graph; use torch.optim",
}


def _for_both(params_of):
    """params_of(name)'s pytest params for Adam and AdamW, as (name, value), the ids
    prefixed with the name."""
    return [pytest.param(name, *p.values, id=f"{name}-{p.id}")
            for name in CLASSES for p in params_of(name)]


@pytest.mark.parametrize("dtype", optim_db_dtypes("Adam", Adam))
@pytest.mark.parametrize("name,kwargs", _for_both(optim_db_configs))
def test_optim_db_config(name, kwargs, dtype):
    """Trains like torch's for-loop implementation for 3 steps (float32, float64 and
    complex64 params), params and states compared element by element, or is refused
    naming the argument, changing nothing."""
    run_optim_db_config(*CLASSES[name], kwargs, REFUSED, normwise=False, dtype=dtype)


def test_refusals_are_documented():
    assert_refusals_documented(REFUSED)


@pytest.mark.parametrize("name,error_input", _for_both(optim_db_error_inputs))
def test_optim_db_error_input(name, error_input):
    """Ours raises an error of (a subclass of) the type torch raises, or a ValueError /
    TypeError naming the offending argument; warnings are warned alike."""
    check_optim_db_error_input(CLASSES[name][0], error_input)
