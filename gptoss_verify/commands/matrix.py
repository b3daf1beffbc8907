"""`gptoss-verify matrix --subject A --subject B ...`: every subject judged on the standard case, one
report (markdown with a PNG beside it, JSON): subjects as rows, probes and trace points as columns."""
from __future__ import annotations

import argparse
import sys

from . import options

NAME = "matrix"
HELP = "judge implementations (subjects) against the float64 truth: trace points and feature probes"
DEFAULT_REPORT = "reports/matrix-{name}.md"


def subject_name(text: str) -> str:
    """argparse type: a subject name of a known form (the subject itself is resolved when run)."""
    from ..subjects.registry import BUILTIN
    fixed = [b for b in BUILTIN if ":" not in b]
    parts = text.split(":")
    if text in fixed or (parts[0] in ("hf", "python") and len(parts) == 3 and all(parts)):
        return text
    raise argparse.ArgumentTypeError(f"unknown subject {text!r}; expected one of {', '.join(BUILTIN)}")


def add_subject_case(p: argparse.ArgumentParser, batch: int = 8, seq: int = 24) -> None:
    """The standard case's shape and seed (`Case.random`); shared with `case export`."""
    options.add_model_source(p)
    p.add_argument("--batch", type=options.positive_int, default=batch, help=f"sequences (default {batch})")
    p.add_argument("--seq", type=options.positive_int, default=seq, help=f"tokens per sequence (default {seq})")
    p.add_argument("--offset", type=int, default=0, help="absolute position of the first token (default 0)")
    p.add_argument("--seed", type=int, default=0, help="weights and token ids (default 0)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subject", type=subject_name, action="append", required=True, metavar="NAME",
                   help="repeatable: reference, fused, hf-eager, hf:ATTN:EXPERTS, hf-mxfp4, openai-torch, "
                        "megatron-core, python:MODULE:CALLABLE")
    add_subject_case(p)
    options.add_dtype(p, repeatable=True, help="repeatable (default: float32 and bfloat16)")
    options.add_device(p)
    p.add_argument("--no-probes", action="store_true", help="judge the trace points only")
    options.add_report(p, default=DEFAULT_REPORT + " (its PNG beside it)")
    options.add_json(p)


def run(args: argparse.Namespace) -> int:
    from ..dtypes import DTYPES
    from ..subjects import matrix
    from ..subjects.protocol import Case
    from ..subjects.transformers_hf import experts_implementations

    spec = options.spec_from_args(args)
    dtypes = args.dtype or ["float32", "bfloat16"]
    cases = [Case.random(spec, DTYPES[d], args.batch, args.seq, args.offset, args.seed, args.device) for d in dtypes]
    rows = matrix.run(args.subject, cases, with_probes=not args.no_probes)
    meta = {**matrix.versions(args.device),
            "case": f"{spec.name} ({spec.num_layers} layers), batch {args.batch} × seq {args.seq}, offset "
                    f"{args.offset}, seed {args.seed}; random weights, typical profile, experts on the MXFP4 grid",
            "transformers experts implementations": ", ".join(experts_implementations()),
            "probes": "not run" if args.no_probes else
                      ("run" if matrix.probes_module() is not None else "not available (subjects/probes.py absent)")}
    data = matrix.to_json(rows, meta)
    report = args.report or DEFAULT_REPORT.format(name=spec.name)
    png = matrix.write(data, report)
    options.write_json(args.json, data)
    for r in rows:
        word = "PASS" if r.status == matrix.JUDGED and r.passed else r.status.upper() if r.status != matrix.JUDGED \
            else "FAIL"
        print(f"{r.subject} {r.dtype}: {word}" + (f" ({r.reason})" if r.reason else ""), file=sys.stderr)
    ok = all(r.passed for r in rows)
    out = sys.stderr if str(args.json) == "-" else sys.stdout  # stdout holds the JSON alone
    print(f"{'PASS' if ok else 'FAIL'}: report written to {report} ({png.name} beside it)", file=out)
    return 0 if ok else 1
