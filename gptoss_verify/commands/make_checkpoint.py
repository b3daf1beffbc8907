"""`gptoss-verify make-checkpoint OUT`: a synthetic checkpoint in the exact published layout.

The weights come from the branch-exercising generator (weights.py), streamed tensor by tensor,
so a full-size preset never sits in memory whole. `--mxfp4` stores the experts as the published
checkpoints do (OCP-rule quantisation of the generated weights); the OpenAI layout is MXFP4 always.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..dtypes import DTYPES
from ..formats import hf, openai
from ..formats.safetensors_io import DEFAULT_MAX_SHARD_BYTES
from ..weights import PROFILES, iter_random_weights
from . import options

NAME = "make-checkpoint"
HELP = "write a synthetic checkpoint in a published layout"
WRITERS = {"hf": hf, "openai": openai}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="output directory (must not exist or be empty)")
    options.add_model_source(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=PROFILES, default="typical", help="weight profile (default typical)")
    options.add_dtype(p, choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--mxfp4", action="store_true", help="store the experts as MXFP4 blocks/scales")
    options.add_layout(p, "to", choices=WRITERS, default="hf", help="the layout written")
    p.add_argument("--max-shard-size", type=options.positive_int, default=DEFAULT_MAX_SHARD_BYTES,
                   help="bytes per safetensors shard (default 5e9, as transformers)")
    options.add_json(p)


def run(args: argparse.Namespace) -> int:
    spec = options.spec_from_args(args)
    dtype = DTYPES[args.dtype]
    layout = args.to_layout
    mxfp4 = args.mxfp4 or layout == "openai"
    if layout == "openai" and not args.mxfp4:
        print("note: the OpenAI layout stores experts as MXFP4: quantised with the OCP MX rule")
    stream = iter_random_weights(spec, seed=args.seed, profile=args.profile, dtype=dtype)
    WRITERS[layout].write(stream, spec, args.out, mxfp4=mxfp4, dtype=dtype, max_shard_bytes=args.max_shard_size,
                          progress=True)
    options.write_json(args.json, {"path": str(args.out), "layout": layout, "mxfp4": mxfp4, "seed": args.seed,
                                   "profile": args.profile, "dtype": args.dtype, "spec": spec.to_json()})
    print(f"wrote {layout}{' MXFP4' if mxfp4 else ''} checkpoint "
          f"{args.out} ({spec.name}, {spec.num_layers} layers, seed {args.seed}, {args.profile} weights, {args.dtype})")
    return 0
