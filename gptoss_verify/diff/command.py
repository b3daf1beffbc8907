"""`gptoss-verify diff A B [--report PATH] [--json PATH]`: does B hold the same model as A?

Exit 0 when it does (bit-exact, or within the exact rounding of the lower side, per tensor, and
configs equal); 1 when it does not, or on bad input (one line on stderr naming file, tensor or
field); 2 on usage (argparse).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .compare import diff
from .deps import CheckpointError, ConfigError, write_atomic
from .report import markdown, summary_lines, to_json

HELP = "is checkpoint B the same model as A; if not, which tensor and which transform"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", type=Path, help="the reference checkpoint (any layout we read)")
    p.add_argument("b", type=Path, help="the checkpoint to check against it")
    p.add_argument("--report", type=Path, help="write the markdown report here")
    p.add_argument("--json", dest="json_path", type=Path, help="write the result as JSON here")
    p.add_argument("--tokens", type=_positive, default=32, help="tokens of the consequence forward (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the consequence tokens")
    p.add_argument("--consequence-layers", type=_positive,
                   help="run the consequence through the first N layers only (full width), no logits")
    p.add_argument("--no-consequence", action="store_true", help="compare tensors and configs only")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `diff` on an argparse subparsers object; the parser's `_run` default runs it."""
    p = subparsers.add_parser("diff", help=HELP, description=HELP)
    add_arguments(p)
    p.set_defaults(_run=run_args)
    return p


def run_args(args: argparse.Namespace) -> int:
    return run(args.a, args.b, report=args.report, json_path=args.json_path, tokens=args.tokens, seed=args.seed,
               consequence=not args.no_consequence, consequence_layers=args.consequence_layers)


def run(a: str | Path, b: str | Path, *, report: str | Path | None = None, json_path: str | Path | None = None,
        tokens: int = 32, seed: int = 0, consequence: bool = True, consequence_layers: int | None = None,
        progress: bool = True, out=None) -> int:
    """Compare, print one line per finding and the verdict, write the reports; 0 same model, 1 not
    or bad input."""
    out = out or sys.stdout
    try:
        result = diff(a, b, consequence=consequence, tokens=tokens, seed=seed,
                      consequence_layers=consequence_layers, progress=progress)
    except (CheckpointError, ConfigError) as err:
        print(f"gptoss-verify diff: error: {err}", file=sys.stderr)
        return 1
    if report:
        write_atomic(report, markdown(result))
    if json_path:
        write_atomic(json_path, json.dumps(to_json(result), indent=2))
    for line in summary_lines(result):
        print(line, file=out)
    return 0 if result.same_model else 1
