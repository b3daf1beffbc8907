"""`gptoss-verify convert SRC DST --to LAYOUT`: any layout to any other, tensor by tensor, atomically."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import options

NAME = "convert"
HELP = "convert a checkpoint between layouts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path, help="must not exist or be empty")
    options.add_layout(p, "to", required=True, help="the layout written")
    options.add_parallel(p)
    p.add_argument("--dequantize", action="store_true", help="write MXFP4 experts as their decoded dense values")
    p.add_argument("--mxfp4", action="store_true",
                   help="hf target: store the experts as MXFP4 even from a dense source (OCP rule; exact for "
                        "values that came from MXFP4, e.g. Megatron back to the published HF layout)")
    p.add_argument("--megatron-names", choices=("te", "local"), default="te",
                   help="megatron target: tensor names of TransformerEngine's layer spec (te, the default, as "
                        "Megatron-Bridge writes) or of megatron-core's local spec (local)")
    options.add_json(p)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert
    r = convert(args.src, args.dst, args.to_layout, tp=args.tp, ep=args.ep, pp=args.pp, pad_vocab=args.pad_vocab,
                dequantize=args.dequantize, mxfp4=args.mxfp4, megatron_names=args.megatron_names,
                progress=True)
    options.write_json(args.json, r)
    print(f"{r.src} ({r.src_layout}) -> {r.dst} ({r.dst_layout}): {r.tensors} tensors, "
          f"{r.bytes_read / 1e9:.3f} GB in {r.seconds:.2f} s ({r.gb_per_s:.2f} GB/s), "
          f"peak RSS {r.peak_rss_bytes / 2**20:.0f} MiB")
    for note in r.notes:
        print(f"note: {note}")
    return 0
