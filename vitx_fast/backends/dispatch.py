"""Pick the backend that runs a method: validate an explicit choice, or walk the priority list."""
from __future__ import annotations

from typing import Any

from vitx_fast.backends.registry import _BACKENDS, get_backend, requested_backend


def select_backend(method, adapter, images, opts: dict[str, Any], backend: str | None = None):
    """Return the Backend to run; raise ValueError (explicit choice refused) or NotImplementedError (nothing fits)."""
    name = requested_backend(backend)
    if name is not None:
        be = get_backend(name)
        reasons = be.not_supported_reasons(method, adapter, images, opts)
        if reasons:
            raise ValueError(f"backend {name!r} cannot run {method.name}: " + "; ".join(reasons))
        return be
    all_reasons = {}
    for be in sorted(_BACKENDS.values(), key=lambda b: b.PRIORITY):
        reasons = be.not_supported_reasons(method, adapter, images, opts) or be.auto_reasons(method, adapter, opts)
        if not reasons:
            return be
        all_reasons[be.NAME] = reasons
    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in all_reasons.items())
    raise NotImplementedError(f"no backend can run {method.name} here ({detail})")


def support_matrix(adapter=None) -> dict[str, dict[str, list[str]]]:
    """method -> backend -> reasons it cannot serve (empty = can), for `vitx info`."""
    from vitx_fast.methods.registry import get_method, list_methods

    out: dict[str, dict[str, list[str]]] = {}
    for mname in list_methods():
        m = get_method(mname)
        out[mname] = {}
        for be in sorted(_BACKENDS.values(), key=lambda b: b.PRIORITY):
            reasons = []
            ok, why = be.is_available()
            if not ok:
                reasons.append(str(why))
            if be.NAME not in m.impls:
                reasons.append(f"no {be.NAME} implementation")
            if adapter is not None and not reasons:
                opts = dict(m.options)
                reasons = m.refusals(adapter, opts) + be.not_supported_reasons(m, adapter, None, opts)
            out[mname][be.NAME] = reasons
    return out
