"""The `dlopt` op namespace.

Ops are defined with `torch.library.Library` and a schema string rather than
`torch.library.custom_op`: custom_op bumps the version counter of every mutated
tensor in Python, which for a 1,000-tensor optimizer step costs more than the
kernel. Here the compiled kernels bump versions in C++ and the Python path (one
`CompositeExplicitAutograd` impl that routes by backend) stays thin. Each op gets a
fake (meta) impl, so it traces under torch.compile and passes opcheck.
"""
from __future__ import annotations

from typing import Callable

import torch

LIB = torch.library.Library("dlopt", "DEF")


def define(schema: str, impl: Callable, fake: Callable):
    """Define `dlopt::<name>` from `schema`; return the op overload packet."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"dlopt::{name}", fake, lib=LIB)
    return getattr(torch.ops.dlopt, name)
