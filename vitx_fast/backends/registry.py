"""Backend registry and selection order: explicit argument > `set_backend(...)` > VITX_FAST_BACKEND > priority list."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from vitx_fast.backends.base import Backend, CppBackend, FusedBackend, ReferenceBackend, TritonBackend

_BACKENDS: dict[str, Backend] = {}
_override: list[str] = []


def register_backend(cls: type[Backend]) -> type[Backend]:
    _BACKENDS[cls.NAME] = cls()
    return cls


register_backend(TritonBackend)
register_backend(CppBackend)
register_backend(FusedBackend)
register_backend(ReferenceBackend)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available backends: {list_backends()}")
    return _BACKENDS[name]


def list_backends() -> list[str]:
    return [b.NAME for b in sorted(_BACKENDS.values(), key=lambda b: b.PRIORITY)]


def requested_backend(explicit: str | None) -> str | None:
    if explicit is not None:
        return explicit
    if _override:
        return _override[-1]
    return os.environ.get("VITX_FAST_BACKEND") or None


@contextlib.contextmanager
def set_backend(name: str) -> Iterator[None]:
    """Use backend `name` for every `explain` call inside the block (an explicit backend= still wins)."""
    get_backend(name)
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()
