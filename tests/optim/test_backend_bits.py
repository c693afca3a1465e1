"""Every optimizer but LAMB steps to the same bits on every compiled backend.

The C++ CPU, CUDA and Triton kernels compute each element with the same fp32 operations
in the same order (the maths headers, and their Triton transcription), with the same
fused multiply-adds (`fmadd` in csrc/include/dlopt/weight_decay.h, `_common.fmadd` in
Triton) and no others (g++ -ffp-contract=off, nvcc --fmad=false, Triton
enable_fp_fusion=False), IEEE division and square roots, and the same random bits for
stochastic rounding. So a run gives the same params, states and steps whichever backend
steps it: a checkpoint moves between them and training goes on identically.

Here, three steps of every optimizer from the same values, over fp32, bf16 with
stochastic rounding and bf16 / fp16 with master weights: the C++ CPU kernels against the
Triton kernels through the interpreter; on a GPU also the compiled Triton kernels
against the CUDA kernels, and the CUDA kernels against the C++ CPU kernels (the device
compiler's arithmetic, which tests/test_cuda_launch_emulation.py cannot see: it runs
the CUDA launchers on the CPU). Not LAMB: its trust ratios divide two norms that the C++
kernel sums in fp32 runs of 128 squares (widened to double between runs, for speed) and
Triton in fp64, so a tensor's step scale can differ by an ulp (a clean-clone CI run
failed on it); the LAMB op tests hold the backends to the tolerance table. What can
still differ in principle: a per-tensor coefficient computed in fp64 by different code
on each side (Triton's pow is square-and-multiply; Adafactor's fp64 sums add in another
order) whose last bits differ and that lies right at an fp32 rounding boundary.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import GPU, bits, device_backends
from dlopt_kernels import optim

CASES = {
    "AdamW": (optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "Adam_amsgrad_l2": (optim.Adam, dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    "SGD_nesterov": (optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "SGD_dampening": (optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1)),
    "SGD_plain": (optim.SGD, dict(lr=0.1, maximize=True)),
    "Adagrad": (optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01)),
    "RMSprop_centered": (optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True,
                                             weight_decay=0.01)),
    "RMSprop": (optim.RMSprop, dict(lr=0.01)),
    "Lion": (optim.Lion, dict(lr=0.01, weight_decay=0.1)),
    # its step sizes come from fp64 sums of squares on both sides (unlike LAMB's norms)
    "Adafactor": (optim.Adafactor, dict(lr=0.01, weight_decay=0.1)),
}
PRECISIONS = {
    "fp32": (torch.float32, {}),
    "bf16_sr": (torch.bfloat16, dict(stochastic_rounding=True)),
    "bf16_master": (torch.bfloat16, dict(master_weights=True)),
    "fp16_master": (torch.float16, dict(master_weights=True)),
}
# odd sizes (vector remainders), a 2-D tensor (Adafactor factors it), several 64K chunks
SHAPES = [(1,), (4097,), (3, 33), (70001,), (64, 130)]
# (device, backend) pairs held to the same bits: Triton against the compiled kernels of
# its device, and on a GPU the CUDA kernels against the C++ CPU kernels
_HAVE = device_backends()
PAIRS = [((dev, "triton"), (dev, be)) for dev, be in _HAVE
         if be in ("cpu", "cuda") and (dev, "triton") in _HAVE]
if ("cuda", "cuda") in _HAVE:
    PAIRS.append((("cuda", "cuda"), ("cpu", "cpu")))


def _steps(cls, kwargs, extra, dtype, device, backend, seed):
    """Params after three steps from values drawn from `seed` (stochastic rounding draws
    its per-step seed from the global generator, seeded alike for both runs)."""
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(3)]
    params = [nn.Parameter(v.to(dtype).to(device)) for v in values]
    opt = cls(params, backend=backend, **kwargs, **extra)
    for k in range(3):
        for p, g in zip(params, grads[k]):
            p.grad = g.to(dtype).to(device)
        torch.manual_seed(seed + k)
        opt.step()
    return params, opt


@pytest.mark.parametrize("run,twin", PAIRS, ids=[f"{a[1]}-vs-{b[1]}" for a, b in PAIRS])
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_backends_step_to_the_samebits(case, precision, run, twin):
    cls, kwargs = CASES[case]
    dtype, extra = PRECISIONS[precision]
    if extra.get("stochastic_rounding") and run[0] != twin[0]:
        pytest.skip("the per-step SR seed comes from each device's own generator")
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh per run (tests/conftest.py seeds it)
    got, opt = _steps(cls, kwargs, extra, dtype, *run, seed)
    want, twin_opt = _steps(cls, kwargs, extra, dtype, *twin, seed)
    backend, twin = f"{run[1]} on {run[0]}", f"{twin[1]} on {twin[0]}"
    for i, (a, b) in enumerate(zip(got, want)):
        differ = int((bits(a) != bits(b)).sum())
        assert differ == 0, (f"{case} {precision}: param {i} (shape {tuple(a.shape)}): {differ} "
                             f"of {a.numel()} elements differ between {backend} and {twin}")
    for i, (p, q) in enumerate(zip(got, want)):
        sa, sb = opt.state[p], twin_opt.state[q]
        assert sorted(sa) == sorted(sb)
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert torch.equal(bits(sa[key]), bits(sb[key])), (
                    f"{case} {precision}: state {key!r} of param {i} differs between "
                    f"{backend} and {twin}")


def test_pairs_cover_the_cpu_kernels():
    """On a CPU machine the pair is the C++ kernels and the interpreted Triton kernels
    (so this test cannot pass by having nothing to compare)."""
    if not GPU:
        assert (("cpu", "triton"), ("cpu", "cpu")) in PAIRS, PAIRS
