"""`gptoss-verify golden regenerate | check`: write the golden logits, or check against them."""
from __future__ import annotations

import argparse
import sys

from .. import golden
from . import options

NAME = "golden"
HELP = "regenerate the golden logits, or check ours / transformers against them"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["regenerate", "check"])
    p.add_argument("--dir", "--out", dest="dir", default=str(golden.DEFAULT_DIR),
                   help="the golden folder (default: golden/ in the project)")
    p.add_argument("--against", choices=["ours", "oracle", "both"], default="ours",
                   help="check our model (no transformers needed), the transformers oracle, or both")
    options.add_report(p)
    options.add_json(p)


def run(args: argparse.Namespace) -> int:
    if args.action == "regenerate":
        golden.regenerate(args.dir)
        print(f"goldens written to {args.dir}")
        return 0
    manifest = golden.load_manifest(args.dir)
    sides = ["ours", "oracle"] if args.against == "both" else [args.against]
    results = [r for side in sides for r in golden.check(args.dir, side)]
    options.write_report(args.report, golden.drift_report(results, manifest))
    options.write_json(args.json, {"passed": all(r.passed for r in results), "cases": results})
    bad = [r for r in results if not r.passed]
    for r in bad:
        print(f"DRIFT {r.side} {r.case}: {r.measure}", file=sys.stderr)
    print(f"{len(results) - len(bad)}/{len(results)} golden cases unchanged" + (f"; report: {args.report}" if args.report else ""))
    return 1 if bad else 0
