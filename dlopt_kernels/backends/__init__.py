"""Backend selection and the per-device kernel modules (imported for registration)."""
from dlopt_kernels.backends import compiled, reference, triton  # noqa: F401
from dlopt_kernels.backends.registry import (  # noqa: F401
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    resolve,
)
