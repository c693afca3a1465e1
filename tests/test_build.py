"""The compiled libraries as built: what the toolchain put into them."""
import shutil
import subprocess

import pytest
import torch

from dlopt_kernels import _lib

COMPILED = [d for d, loaded in (("cpu", _lib.LOADED["cpu"]),
                                ("cuda", _lib.LOADED["cuda"] and torch.cuda.is_available()))
            if loaded]


@pytest.mark.parametrize("device", COMPILED)
def test_error_messages_format_numbers(device):
    """A refused call's message carries its numbers. Linked against a private static
    libstdc++ (setup.py shared_libstdcxx says how that happened), formatting the first
    number cut the message short on one machine and segfaulted on another."""
    ps = [torch.randn(6, device=device), torch.randn(2, 3, device=device)]
    zeros = [torch.zeros_like(p) for p in ps]
    steps = [torch.zeros((), device=device) for _ in ps]
    with pytest.raises(RuntimeError, match=r"grads has 1 tensors but params has 2"):
        torch.ops.dlopt_C.adam_step(ps, ps[:1], zeros, zeros, [], [], steps,
                                    torch.tensor(1e-3, device=device), 0.9, 0.999, 0.0, 1e-8,
                                    False, False, False, None, None, None)


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
@pytest.mark.parametrize("device", COMPILED)
def test_libstdcxx_is_the_shared_one(device):
    import importlib
    module = importlib.import_module("dlopt_kernels._C" if device == "cpu" else "dlopt_kernels._C_cuda")
    out = subprocess.run(["ldd", module.__file__], capture_output=True, text=True).stdout
    assert "libstdc++.so" in out, out
