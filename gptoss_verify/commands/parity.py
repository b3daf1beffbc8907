"""`gptoss-verify parity`: ours against transformers, layer by layer, with a markdown report."""
from __future__ import annotations

import argparse
import sys

from ..dtypes import DTYPES, dtype_name
from ..model.faults import FAULTS
from ..weights import PROFILES
from . import options

NAME = "parity"
HELP = "compare our model with transformers layer by layer"
DEFAULT_REPORT = "reports/parity-{name}.md"


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model_source(p, checkpoint=True)
    p.add_argument("--seq", type=options.positive_int, help="sequence length (default: 40 for tiny, 256 otherwise)")
    p.add_argument("--batch", type=options.positive_int, default=2)
    p.add_argument("--offset", type=int, default=0, help="absolute position of the first token")
    options.add_dtype(p, repeatable=True, help="repeatable (default: float64 and bfloat16)")
    p.add_argument("--profile", choices=PROFILES, action="append",
                   help="random-weight profile, repeatable (default: typical and stress)")
    options.add_device(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["reference", "fused"], default="reference")
    p.add_argument("--inject", metavar="FAULT", action="append", default=[], choices=sorted(FAULTS),
                   help="switch on a bug-zoo fault in our model (repeatable)")
    p.add_argument("--stream-layers", action="store_true",
                   help="hold one decoder layer's weights on the device at a time, drawn on entry and freed on "
                        "exit, for ours, the oracle and the float64 truth (gpt-oss-120b on one GPU)")
    options.add_report(p, default=DEFAULT_REPORT)
    options.add_json(p)


def run(args: argparse.Namespace) -> int:
    from ..backends import block_functions
    from ..parity.run import ParityCase, run_case
    from ..report import parity_json, parity_markdown

    try:  # two faults that replace the same block function cannot be combined: a usage error
        block_functions(args.backend, tuple(args.inject))
    except ValueError as err:
        print(f"gptoss-verify parity: error: --inject: {err}", file=sys.stderr)
        return 2

    if args.checkpoint is not None:
        spec, state = options.load_checkpoint(args.checkpoint, args.layers)
        source = f"checkpoint {args.checkpoint}"
    else:
        spec, state, source = options.spec_from_args(args), None, "random"
    seq = args.seq or (40 if spec.name == "tiny" else 256)
    dtypes = [DTYPES[d] for d in (args.dtype or ["float64", "bfloat16"])]
    profiles = ["checkpoint"] if state is not None else (args.profile or list(PROFILES))
    results = []
    for profile in profiles:
        for dtype in dtypes:
            case = ParityCase(spec, dtype, profile if state is None else "typical", args.seed, args.batch, seq,
                              args.offset, args.device, args.backend, tuple(args.inject), source, args.stream_layers)
            result = run_case(case, state)
            if state is not None:
                result.case.profile = "checkpoint"
            fd = result.first_divergence
            print(f"{spec.name} {dtype_name(dtype)} {result.case.profile}: "
                  + ("PASS" if fd is None else f"FAIL at {fd.name} ({fd.mode}, {fd.kind})")
                  + f"  [{result.seconds:.1f}s]", file=sys.stderr)
            results.append(result)
    report = args.report or DEFAULT_REPORT.format(name=spec.name)
    options.write_report(report, parity_markdown(results, args.device))
    options.write_json(args.json, parity_json(results))
    ok = all(r.passed for r in results)
    print(f"{'PASS' if ok else 'FAIL'}: report written to {report}")
    return 0 if ok else 1
