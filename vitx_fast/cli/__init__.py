"""`vitx`: the command line. One module per subcommand, each with `add_parser(subparsers)` and its `cmd_*`."""
from __future__ import annotations

import argparse
import sys

from vitx_fast.cli import bench, data, demo, evaluate, explain, export, info, train_tame
from vitx_fast.cli._common import CLIError

COMMANDS = (explain, demo, bench, evaluate, train_tame, export, info, data)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitx", description="Exact, fast explanations for timm Vision Transformers")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"vitx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitx: interrupted (finished outputs are kept)", file=sys.stderr)
        return 130


__all__ = ["CLIError", "build_parser", "main"]
