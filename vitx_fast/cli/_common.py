"""Pieces every `vitx` subcommand shares: the one-line error, output folders, method and target arguments."""
from __future__ import annotations

from pathlib import Path


class CLIError(Exception):
    """A one-line error for the user; the CLI prints it and exits non-zero."""


def load_model(name: str, checkpoint: str | None = None, pretrained: bool | None = None):
    """`vitx_fast.models.load_model` with its errors as CLIError."""
    from vitx_fast.models.loading import ModelLoadError
    from vitx_fast.models.loading import load_model as _load

    try:
        return _load(name, checkpoint, pretrained)
    except ModelLoadError as exc:
        raise CLIError(str(exc)) from None


def ensure_writable(out: Path) -> None:
    """Create the output folder and check that a file can be created in it."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".vitx-write-test-"):  # O_EXCL, never follows a link
            pass
    except OSError as exc:
        raise CLIError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None


def parse_methods(arg: list[str] | None, default: tuple[str, ...] = ("reciprocam",)) -> list[str]:
    """--method values -> method names ('all' = every method); unknown names are an error naming the valid ones."""
    import vitx_fast as vx

    available = vx.list_methods()
    if not arg:
        return list(default)
    if arg == ["all"]:
        return available
    for m in arg:
        if m not in available:
            raise CLIError(f"unknown method {m!r}; available: {', '.join(available)}")
    return arg


def parse_target(t: str | None):
    """--target: top1 (None), all, or class indices '3' / '3,5'."""
    if t is None or t == "top1":
        return None
    if t == "all":
        return "all"
    try:
        vals = [int(v) for v in t.split(",")]
    except ValueError:
        raise CLIError(f"--target must be top1, all, or class indices like 3 or 3,5; got {t!r}") from None
    return vals[0] if len(vals) == 1 else [vals]


def check_target(target, model) -> None:
    """Class indices of --target against the model's classes, before any image is read."""
    n = getattr(model, "num_classes", None)
    if target is None or target == "all" or not n:
        return
    vals = [target] if isinstance(target, int) else target[0]
    bad = [v for v in vals if not 0 <= v < n]
    if bad:
        raise CLIError(f"--target: class index {bad[0]} out of range for a model with {n} classes (0..{n - 1})")
