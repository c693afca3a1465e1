"""torch.use_deterministic_algorithms(True) and the backends whose GPU kernels add with
atomics (Adafactor's cuda and triton kernels): `auto` passes over them on CUDA tensors
(logged once), an explicit one is refused with a ValueError naming the backend, or
warned about under warn_only=True; other ops, other devices and the mode switched off
are untouched. The CUDA side is checked through the registry with the GPU backends
pretended available (this machine may have no GPU), and for real on a GPU."""
import logging
import warnings

import pytest
import torch

from dlopt_kernels.backends import registry
from dlopt_kernels.backends.registry import BackendUnavailableError

CUDA = torch.device("cuda")


@pytest.fixture
def deterministic():
    """Switch torch's deterministic mode on (the test picks warn_only), restore after."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    registry.clear_cache()
    yield lambda warn_only=False: torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    registry.clear_cache()


@pytest.fixture
def gpu_backends(monkeypatch):
    """The cuda and triton backends as if a GPU and both libraries were here."""
    real = registry.why_unavailable

    def why(backend, device_type):
        if device_type == "cuda" and backend in ("cuda", "triton", "reference"):
            return None
        return real(backend, device_type)

    monkeypatch.setattr(registry, "why_unavailable", why)
    monkeypatch.setattr(registry, "_LOGGED", set())
    registry.clear_cache()
    yield
    registry.clear_cache()


def test_auto_passes_over_atomic_kernels_only_in_deterministic_mode(gpu_backends, deterministic,
                                                                    caplog):
    assert registry.resolve("adafactor_step", CUDA, "auto")[0] == "cuda"
    deterministic()
    with caplog.at_level(logging.WARNING, logger="dlopt_kernels"):
        for _ in range(3):
            assert registry.resolve("adafactor_step", CUDA, "auto")[0] == "reference"
    said = [r.getMessage() for r in caplog.records if "adafactor_step" in r.getMessage()]
    assert len(said) == 1 and "use_deterministic_algorithms" in said[0] and "atomics" in said[0]
    # kernels without atomics keep their backend; so do CPU tensors
    for op in ("adam_step", "sgd_step", "lamb_step", "multi_tensor_norm"):
        assert registry.resolve(op, CUDA, "auto")[0] == "cuda", op
    assert registry.resolve("adafactor_step", torch.device("cpu"), "auto")[0] in ("cpu", "reference")
    torch.use_deterministic_algorithms(False)
    assert registry.resolve("adafactor_step", CUDA, "auto")[0] == "cuda"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_an_explicit_atomic_backend_is_refused_then_warned_under_warn_only(gpu_backends,
                                                                           deterministic, backend):
    assert registry.resolve("adafactor_step", CUDA, backend)[0] == backend
    deterministic()
    for _ in range(2):  # the refusal is not cached away
        with pytest.raises(BackendUnavailableError, match=rf"backend='{backend}' cannot run "
                           r"adafactor_step deterministically \(it adds .*fp64 atomics"):
            registry.resolve("adafactor_step", CUDA, backend)
    assert isinstance(BackendUnavailableError("x"), ValueError)
    assert registry.resolve("adafactor_step", CUDA, "reference")[0] == "reference"
    assert registry.resolve("adam_step", CUDA, backend)[0] == backend
    deterministic(warn_only=True)
    for _ in range(2):
        with pytest.warns(UserWarning, match="warn_only=True: running it anyway"):
            assert registry.resolve("adafactor_step", CUDA, backend)[0] == backend


def test_cpu_adafactor_steps_deterministically_in_deterministic_mode(deterministic):
    """On the CPU nothing is refused, and two runs give the same bits."""
    from dlopt_kernels.optim import Adafactor

    deterministic()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    shapes = [(33, 17), (5, 7, 9), (100,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]

    def run():
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = Adafactor(ps, lr=0.01)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in ps]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = run(), run()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_adafactor_in_deterministic_mode_runs_the_reference_kernels(deterministic):
    from dlopt_kernels.optim import Adafactor

    deterministic()
    gen = torch.Generator(device="cuda").manual_seed(1)
    shapes = [(1000, 300), (4, 64, 65), (4097,)]
    init = [torch.randn(s, generator=gen, device="cuda") for s in shapes]
    grads = [[torch.randn(s, generator=gen, device="cuda") for s in shapes] for _ in range(3)]

    def run(backend):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = Adafactor(ps, lr=0.01, backend=backend)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in ps]

    auto, again, ref = run("auto"), run("auto"), run("reference")
    for x, y, z in zip(auto, again, ref):
        assert torch.equal(x, y) and torch.equal(x, z)
    with pytest.raises(BackendUnavailableError, match="deterministically"):
        run("cuda")
