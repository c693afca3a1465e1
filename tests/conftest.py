import os

# Triton kernels run on the CPU through the interpreter; this must be set before any
# @triton.jit function is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..",
                                                               ".torchinductor"))

import pytest  # noqa: E402
import torch  # noqa: E402

import dlopt_kernels  # noqa: E402,F401
from dlopt_kernels.backends import available_backends  # noqa: E402

CPU_BACKENDS = available_backends("cpu")  # cpu (if compiled), triton (interpreted), reference
GPU = torch.cuda.is_available()


def pytest_report_header(config):
    return f"dlopt backends on cpu: {CPU_BACKENDS}; cuda available: {GPU}"


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run, but printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little") if "DLOPT_TEST_SEED" not in os.environ \
        else int(os.environ["DLOPT_TEST_SEED"])
    torch.manual_seed(seed)
    yield seed


def device_backends():
    """(device, backend) pairs every kernel test runs over on this machine."""
    pairs = [("cpu", b) for b in CPU_BACKENDS]
    if GPU:
        pairs += [("cuda", b) for b in available_backends("cuda")]
    return pairs
