"""`gptoss-verify make-checkpoint OUT`: a synthetic checkpoint in the exact published layout.

The weights come from the branch-exercising generator (weights.py), streamed tensor by tensor,
so a full-size preset never sits in memory whole. `--mxfp4` stores the experts as the published
checkpoints do (OCP-rule quantisation of the generated weights); the OpenAI layout is MXFP4 always.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..config import ModelSpec, preset
from ..formats import hf, openai
from ..formats.errors import CheckpointError
from ..formats.safetensors_io import DEFAULT_MAX_SHARD_BYTES
from ..weights import PROFILES, iter_random_weights

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="output directory (must not exist or be empty)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="tiny | gpt-oss-20b | gpt-oss-120b (default tiny)")
    src.add_argument("--config", type=Path, help="an HF or OpenAI original config.json")
    p.add_argument("--layers", type=int, help="keep only the first N layers (full width)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=PROFILES, default="typical", help="weight profile (default typical)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--mxfp4", action="store_true", help="store the experts as MXFP4 blocks/scales")
    p.add_argument("--format", choices=["hf", "openai"], default="hf")
    p.add_argument("--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                   help="bytes per safetensors shard (default 5e9, as transformers)")


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    if args.config is not None:
        try:
            cfg = json.loads(args.config.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{args.config}: cannot read config ({err})") from None
        spec = (ModelSpec.from_openai_config(cfg, name=args.config.stem) if "num_experts" in cfg
                and "model_type" not in cfg else ModelSpec.from_hf_config(cfg, name=args.config.stem))
    else:
        spec = preset(args.preset)
    if args.layers is not None:
        if args.layers < 1:
            raise CheckpointError(f"--layers: expected a positive number, got {args.layers}")
        spec = spec.with_layers(args.layers)
    return spec


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    dtype = DTYPES[args.dtype]
    stream = iter_random_weights(spec, seed=args.seed, profile=args.profile, dtype=dtype)
    if args.format == "hf":
        hf.write(stream, spec, args.out, mxfp4=args.mxfp4, dtype=dtype, max_shard_bytes=args.max_shard_size,
                 progress=True)
    else:
        if not args.mxfp4:
            print("note: the OpenAI layout stores experts as MXFP4: quantised with the OCP MX rule")
        openai.write(stream, spec, args.out, mxfp4=True, dtype=dtype, max_shard_bytes=args.max_shard_size,
                     progress=True)
    print(f"wrote {args.format}{' MXFP4' if args.mxfp4 or args.format == 'openai' else ''} checkpoint "
          f"{args.out} ({spec.name}, {spec.num_layers} layers, seed {args.seed}, {args.profile} weights, {args.dtype})")
    return 0
