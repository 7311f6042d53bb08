"""Method registry: `@register_method`, `get_method`, `list_methods`."""
from __future__ import annotations

from vitx_fast.methods.base import Method

_METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    inst = cls()
    _METHODS[cls.name] = inst
    cls.instance = inst  # type: ignore[attr-defined]
    return cls


def get_method(name: str) -> Method:
    _load_builtin()
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available methods: {list_methods()}")
    return _METHODS[name]


def list_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


_LOADED: list[bool] = []


def _load_builtin() -> None:
    if _LOADED:
        return
    _LOADED.append(True)
    # importing the method modules registers them
    from vitx_fast.methods import agcam, chefer_lrp, daam, gae, grad_rollout, reciprocam, rollout  # noqa: F401
    from vitx_fast.methods import ttame  # noqa: F401

    # fast implementations register themselves beside the reference ones
    from vitx_fast.fused import agcam as _fa, daam as _fd, gae as _fg, lrp as _fl  # noqa: F401
    from vitx_fast.fused import reciprocam as _fr, rollout as _fro  # noqa: F401
    from vitx_fast.fused import kernel_backends

    kernel_backends.register_all(_METHODS)
