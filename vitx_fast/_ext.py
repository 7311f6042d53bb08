"""Optional native module: import it once and remember why it failed, so dispatch and `vitx info` can say so."""
from __future__ import annotations

_C = None
_IMPORT_ERROR: str | None = None
try:
    from vitx_fast import _C  # type: ignore[attr-defined,no-redef]
except Exception as exc:
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def is_available() -> bool:
    return _C is not None


def import_error() -> str | None:
    return _IMPORT_ERROR
