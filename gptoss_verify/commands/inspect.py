"""`gptoss-verify inspect CKPT`: detect the layout and check every tensor against the config.

Reads only headers unless `--scan` is given (then NaN/Inf and MXFP4 scale ranges too). Exits 1
on any violation, listing each one (file, tensor, expected, got).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..formats import validate
from . import options

NAME = "inspect"
HELP = "detect a checkpoint's layout and check every tensor"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", type=Path, help="checkpoint directory")
    p.add_argument("--scan", action="store_true", help="also read the values (NaN/Inf, MXFP4 scale ranges)")
    options.add_layout(p, "from", help="read as this layout instead of detecting it")
    options.add_json(p)


def run(args: argparse.Namespace) -> int:
    result = validate.inspect(args.ckpt, scan=args.scan, layout=args.from_layout, progress=args.scan)
    options.write_json(args.json, result.to_json())
    if str(args.json) == "-":  # stdout holds the JSON alone
        return 0 if result.ok else 1
    spec = result.spec
    print(f"{result.path}: layout {result.layout}"
          + (f", {spec.get('num_layers')} layers, hidden {spec.get('hidden_size')}, "
             f"{spec.get('num_experts')} experts, vocab {spec.get('vocab_size')}" if spec else "")
          + f"; {result.tensors} tensors, {result.bytes} bytes; options {result.options}")
    for r in result.scale_ranges[:8]:
        print(f"  MXFP4 scales {r.tensor}: exponents {r.min_exponent}..{r.max_exponent}")
    if len(result.scale_ranges) > 8:
        lo = min(r.min_exponent for r in result.scale_ranges)
        hi = max(r.max_exponent for r in result.scale_ranges)
        print(f"  ... {len(result.scale_ranges)} scale tensors in all, exponents {lo}..{hi}")
    for v in result.violations:
        print(f"  VIOLATION {v}")
    print("OK" if result.ok else f"FAIL: {len(result.violations)} violation(s)")
    return 0 if result.ok else 1
