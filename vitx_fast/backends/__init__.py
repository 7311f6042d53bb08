from vitx_fast.backends.base import Backend, ReferenceBackend
from vitx_fast.backends.dispatch import select_backend, support_matrix
from vitx_fast.backends.registry import get_backend, list_backends, register_backend, set_backend

__all__ = [
    "Backend", "ReferenceBackend", "get_backend", "list_backends", "register_backend", "select_backend",
    "set_backend", "support_matrix",
]
