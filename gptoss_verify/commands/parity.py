"""`gptoss-verify parity`: ours against transformers, layer by layer, with a markdown report.

Exit 0 when every point of every case passes, 1 when any fails, 2 on bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..config import PRESETS, ConfigError, ModelSpec, preset
from ..model.faults import FAULTS
from ..weights import PROFILES

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_REPORT = "reports/parity-{name}.md"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="architecture preset (default: tiny)")
    src.add_argument("--config", metavar="PATH", help="an HF or OpenAI-original config.json")
    src.add_argument("--checkpoint", metavar="DIR", help="compare on the weights of a checkpoint on disk")
    p.add_argument("--layers", type=int, help="build only the first N layers (at full width)")
    p.add_argument("--seq", type=int, help="sequence length (default: 40 for tiny, 256 otherwise)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--offset", type=int, default=0, help="absolute position of the first token")
    p.add_argument("--dtype", choices=sorted(DTYPES), action="append",
                   help="repeatable (default: float64 and bfloat16)")
    p.add_argument("--profile", choices=PROFILES, action="append",
                   help="random-weight profile, repeatable (default: typical and stress)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["reference", "fused"], default="reference")
    p.add_argument("--inject", metavar="FAULT", action="append", default=[], choices=sorted(FAULTS),
                   help="switch on a bug-zoo fault in our model (repeatable)")
    p.add_argument("--report", metavar="PATH", help=f"markdown report (default: {DEFAULT_REPORT})")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def _spec(args) -> tuple[ModelSpec, dict | None, str]:
    """The spec to check, weights from a checkpoint if one was given, and a label for the weights."""
    if args.checkpoint:
        spec, state = _load_dense(args.checkpoint)
        if args.layers:
            state = _first_layers(state, args.layers)
            spec = spec.with_layers(args.layers)
        return spec, state, f"checkpoint {args.checkpoint}"
    if args.config:
        from pathlib import Path
        data = json.loads(Path(args.config).read_text())
        spec = ModelSpec.from_hf_config(data) if "num_local_experts" in data or "model_type" in data \
            else ModelSpec.from_openai_config(data)
    else:
        spec = preset(args.preset or "tiny")
    if args.layers:
        spec = spec.with_layers(args.layers)
    return spec, None, "random"


def _load_dense(path: str) -> tuple[ModelSpec, dict]:
    """Any layout on disk as dense canonical tensors (MXFP4 experts decoded, exactly, to bf16)."""
    from ..formats import layout
    from ..formats.canonical import to_dense
    spec, stream = layout.module(layout.detect(path)).read(path)
    return spec, dict(to_dense(stream))


def _first_layers(state: dict, n: int) -> dict:
    keep = {}
    for name, t in state.items():
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= n:
            continue
        keep[name] = t
    return keep


def run(args) -> int:
    from ..report import parity_json, parity_markdown, write_atomic
    from .run import ParityCase, run_case

    try:
        spec, state, source = _spec(args)
    except ConfigError as err:
        print(f"gptoss-verify parity: error: {err}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gptoss-verify parity: error: --device cuda asked for, but no CUDA device is available", file=sys.stderr)
        return 2
    seq = args.seq or (40 if spec.name == "tiny" else 256)
    dtypes = [DTYPES[d] for d in (args.dtype or ["float64", "bfloat16"])]
    profiles = ["checkpoint"] if state is not None else (args.profile or list(PROFILES))
    results = []
    for profile in profiles:
        for dtype in dtypes:
            case = ParityCase(spec, dtype, profile if state is None else "typical", args.seed, args.batch, seq,
                              args.offset, args.device, args.backend, tuple(args.inject), source)
            result = run_case(case, state)
            if state is not None:
                result.case.profile = "checkpoint"
            fd = result.first_divergence
            print(f"{spec.name} {str(dtype).removeprefix('torch.')} {result.case.profile}: "
                  + ("PASS" if fd is None else f"FAIL at {fd.name} ({fd.mode}, {fd.kind})")
                  + f"  [{result.seconds:.1f}s]", file=sys.stderr)
            results.append(result)
    report = args.report or DEFAULT_REPORT.format(name=spec.name)
    write_atomic(report, parity_markdown(results, args.device))
    if args.json:
        write_atomic(args.json, json.dumps(parity_json(results), indent=1, default=str))
    ok = all(r.passed for r in results)
    print(f"{'PASS' if ok else 'FAIL'}: report written to {report}")
    return 0 if ok else 1
