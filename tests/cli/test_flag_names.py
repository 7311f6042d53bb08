"""One spelling per flag across the `vitx` subcommands: `--method` for methods, `--batch-size` for a batch size;
older spellings still parse but are not advertised."""
import argparse

import pytest

from vitx_fast.cli import build_parser


def subcommands():
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, parser in sub.choices.items():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for n in nested:
            out.update({f"{name} {k}": v for k, v in n.choices.items()})
        if not nested:
            out[name] = parser
    return out


@pytest.mark.parametrize("name", sorted(n for n in subcommands() if n != "bench"))  # bench: vitx_fast/bench.py
def test_flag_spellings(name):
    parser = subcommands()[name]
    shown = [s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings]
    method_flags = [s for s in shown if "method" in s]
    batch_flags = [s for s in shown if "batch" in s and "timeout" not in s]
    assert set(method_flags) <= {"--method"}, method_flags
    assert set(batch_flags) <= {"--batch-size", "--max-batch-size"}, batch_flags  # serve: a dynamic batch's cap
    help_text = parser.format_help()
    assert "--methods" not in help_text and "--static-batch" not in help_text


def test_hidden_aliases_still_parse():
    p = build_parser()
    assert p.parse_args(["evaluate", "--methods", "gae", "rollout"]).methods == ["gae", "rollout"]
    assert p.parse_args(["evaluate", "--method", "gae"]).methods == ["gae"]
    assert p.parse_args(["export", "--out", "m.onnx", "--static-batch", "3"]).static_batch == 3
    assert p.parse_args(["export", "--out", "m.onnx", "--batch-size", "4"]).static_batch == 4
    assert p.parse_args(["export", "--out", "m.onnx"]).static_batch is None
    assert p.parse_args(["evaluate"]).batch_size == 32
