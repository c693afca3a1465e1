"""Backend selection (registry.py) and the pure-torch reference kernels (reference/)."""
from dlopt_kernels.backends.registry import (  # noqa: F401
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    resolve,
)
