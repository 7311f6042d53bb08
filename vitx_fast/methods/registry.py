"""Method registry: `@register_method`, `get_method`, `list_methods` (timm-style: registered at import)."""
from __future__ import annotations

import warnings

from vitx_fast.methods.base import Method

_METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: instantiate the method and register it under `cls.name` (a duplicate name warns and
    replaces the earlier registration)."""
    if cls.name in _METHODS:
        warnings.warn(f"method {cls.name!r} is registered twice; {cls.__module__}.{cls.__qualname__} replaces "
                      f"{type(_METHODS[cls.name]).__module__}.{type(_METHODS[cls.name]).__qualname__}",
                      stacklevel=2)
    _METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available methods: {list_methods()}")
    return _METHODS[name]


def list_methods() -> list[str]:
    return sorted(_METHODS)
