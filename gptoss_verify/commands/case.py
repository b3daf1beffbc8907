"""`gptoss-verify case export DIR`: a self-contained case for an out-of-process engine (a C++ or
serving engine): a checkpoint in the layout asked for (bf16 or MXFP4 experts), the token ids and
positions, a manifest. The engine writes a safetensors dump; `gptoss-verify judge DIR DUMP` judges it
(format: `subjects/dump.py`, docs/subjects.md)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import options
from .matrix import add_subject_case

NAME = "case"
HELP = "export a self-contained case (checkpoint, token ids, positions, manifest) for an engine to run"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = sub.add_parser("export", help="write the case into DIR (written under a temporary name, then renamed)")
    export.add_argument("out_dir", type=Path, metavar="DIR", help="the case directory (must not exist, or be empty)")
    options.add_layout(export, "to", default="hf", help="the checkpoint's layout")
    export.add_argument("--mxfp4", action="store_true", help="MXFP4 experts (hf and openai layouts; else dense)")
    options.add_dtype(export, choices=("bfloat16", "float32"), default="bfloat16",
                      help="the dtype of the checkpoint and of the engine's run (default bfloat16)")
    add_subject_case(export, batch=2, seq=32)
    options.add_json(export)


def run(args: argparse.Namespace) -> int:
    from ..dtypes import DTYPES
    from ..subjects.dump import export_case
    from ..subjects.protocol import Case

    spec = options.spec_from_args(args)
    case = Case.random(spec, DTYPES[args.dtype], args.batch, args.seq, args.offset, args.seed)
    mxfp4 = args.mxfp4 or args.to_layout == "openai"  # the OpenAI layout stores MXFP4 experts always
    export_case(case, args.out_dir, args.to_layout, mxfp4, args.seed)
    options.write_json(args.json, {"path": str(args.out_dir), "layout": args.to_layout, "mxfp4": mxfp4,
                                   "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
                                   "offset": args.offset, "seed": args.seed, "spec": spec.to_json()})
    out = sys.stderr if str(args.json) == "-" else sys.stdout
    print(f"wrote case {args.out_dir} ({args.to_layout}{' MXFP4' if mxfp4 else ''} {args.dtype} checkpoint, "
          f"{args.batch} × {args.seq} tokens from position {args.offset}); run it, then "
          f"`gptoss-verify judge {args.out_dir} DUMP.safetensors`", file=out)
    return 0
