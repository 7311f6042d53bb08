"""`vitx`: the command line. One module per subcommand, each with `add_parser(subparsers)` and its `cmd_*`."""
from __future__ import annotations

import argparse
import logging
import sys

from vitx_fast.cli import bench, data, demo, evaluate, explain, export, info, render, serve, train_tame
from vitx_fast.cli._common import CLIError

COMMANDS = (explain, demo, bench, evaluate, train_tame, export, info, data, serve, render)


class _StderrHandler(logging.Handler):
    """One line per record on the current sys.stderr (looked up at each record, not when the handler is made)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record):
        try:
            print(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def build_parser() -> argparse.ArgumentParser:
    from vitx_fast import __version__

    p = argparse.ArgumentParser(prog="vitx", description="Exact, fast explanations for timm Vision Transformers")
    p.add_argument("--version", action="version", version=f"vitx-fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the library logs through `logging`; the command shows its info and warnings on stderr, one line each
    lib = logging.getLogger("vitx_fast")
    if not any(isinstance(h, _StderrHandler) for h in lib.handlers):
        lib.addHandler(_StderrHandler())
    lib.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"vitx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitx: interrupted (finished outputs are kept)", file=sys.stderr)
        return 130


__all__ = ["CLIError", "build_parser", "main"]
