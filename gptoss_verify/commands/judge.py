"""`gptoss-verify judge DIR DUMP`: the verdict on an engine's safetensors dump (`logits` [B, S, V]
plus any trace points under our names) of a case written by `gptoss-verify case export`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import options

NAME = "judge"
HELP = "judge an engine's safetensors dump of a case exported by `case export`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("case_dir", type=Path, metavar="DIR", help="a case directory written by `case export`")
    p.add_argument("dump", type=Path, metavar="DUMP", help="the engine's safetensors dump (logits plus any points)")
    p.add_argument("--name", default="engine", help="the subject's name in the report (default engine)")
    options.add_report(p)
    options.add_json(p)


def run(args: argparse.Namespace) -> int:
    from ..subjects import matrix
    from ..subjects.dump import judge_dump

    verdict = judge_dump(args.case_dir, args.dump, args.name)  # a bad case or dump: SubjectError, exit 1
    row = matrix.Row(args.name, verdict.dtype, matrix.JUDGED, verdict=verdict)
    data = matrix.to_json([row], {**matrix.versions("cpu"), "case": str(args.case_dir), "dump": str(args.dump)})
    if args.report:
        matrix.write(data, args.report)
    options.write_json(args.json, data)
    out = sys.stderr if str(args.json) == "-" else sys.stdout
    for cell in verdict.cells:
        if not cell.verdict.passed:
            print(f"{cell.name}: {cell.verdict}", file=out)
    for name, why in verdict.not_judged.items():
        print(f"{name}: not judged, {why}", file=out)
    first = verdict.first_failure
    print("PASS" if verdict.passed else f"FAIL: first failing point {first.name}", f"({len(verdict.cells)} cells judged)",
          file=out)
    return 0 if verdict.passed else 1
