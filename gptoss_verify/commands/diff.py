"""`gptoss-verify diff A B`: do two checkpoints hold the same model; if not, which tensor and which
transform (the library is `gptoss_verify/diff/`; `docs/diff.md`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import options

NAME = "diff"
HELP = "is checkpoint B the same model as A; if not, which tensor and which transform"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", type=Path, help="the reference checkpoint (any layout we read)")
    p.add_argument("b", type=Path, help="the checkpoint to check against it")
    options.add_report(p)
    options.add_json(p)
    p.add_argument("--tokens", type=options.positive_int, default=32,
                   help="tokens of the consequence forward (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the consequence tokens")
    p.add_argument("--consequence-layers", type=options.positive_int,
                   help="run the consequence through the first N layers only (full width), no logits")
    p.add_argument("--no-consequence", action="store_true", help="compare tensors and configs only")


def run(args: argparse.Namespace) -> int:
    """0 when B holds the same model as A (bit-exact, or within the lower side's exact rounding, per
    tensor, and configs equal), 1 when not; bad input raises and `cli` makes it one line and exit 1."""
    from ..diff.compare import diff
    from ..diff.report import markdown, summary_lines, to_json
    result = diff(args.a, args.b, consequence=not args.no_consequence, tokens=args.tokens, seed=args.seed,
                  consequence_layers=args.consequence_layers, progress=True)
    options.write_report(args.report, markdown(result))
    options.write_json(args.json, to_json(result))
    out = sys.stderr if str(args.json) == "-" else sys.stdout  # stdout holds the JSON alone
    for line in summary_lines(result):
        print(line, file=out)
    return 0 if result.same_model else 1
