import os

# Triton kernels run on the CPU through the interpreter; this must be set before any
# @triton.jit function is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..",
                                                               ".torchinductor"))

import pytest  # noqa: E402

if os.environ.get("DLOPT_TRITON_LAUNCH_LOG"):
    # tools/check_triton.py compiles for a GPU every Triton launch this run makes
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    from check_triton import record_launches
    record_launches(os.environ["DLOPT_TRITON_LAUNCH_LOG"])

# the shared test helpers' plain asserts explain their failures like the tests' own
# (before anything imports them)
pytest.register_assert_rewrite("optim_twin_helpers", "optim_op_helpers")

import torch  # noqa: E402

import dlopt_kernels  # noqa: E402,F401
from dlopt_kernels.backends import available_backends  # noqa: E402
# fresh random inputs every test (seeded from os.urandom, or DLOPT_TEST_SEED), and a
# failing test's report shows the seed and how to replay it
from seed_replay import _fresh_seed, pytest_runtest_makereport  # noqa: E402,F401

CPU_BACKENDS = available_backends("cpu")  # cpu (if compiled), triton (interpreted), reference
GPU = torch.cuda.is_available()


def pytest_report_header(config):
    return f"dlopt backends on cpu: {CPU_BACKENDS}; cuda available: {GPU}"


def device_backends():
    """(device, backend) pairs every kernel test runs over on this machine."""
    pairs = [("cpu", b) for b in CPU_BACKENDS]
    if GPU:
        pairs += [("cuda", b) for b in available_backends("cuda")]
    return pairs


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's elements as integers of their width, on the CPU, flattened: equal bits
    compare equal (NaN included, and -0 against 0 not)."""
    t = t.detach().cpu().reshape(-1)
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
