"""`gptoss-verify roundtrip SRC --via LAYOUT`: SRC -> via -> back, every tensor compared bit for bit.

Writes a markdown report (one row per tensor group, timings and peak memory per leg) and exits 1
if any tensor differs or is missing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import options

NAME = "roundtrip"
HELP = "convert there and back, compare bit for bit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path)
    options.add_layout(p, "via", required=True, help="the layout passed through")
    options.add_parallel(p)
    options.add_report(p)
    options.add_json(p)
    p.add_argument("--work-dir", type=Path, help="where the intermediate checkpoints go (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the intermediate checkpoints")


def run(args: argparse.Namespace) -> int:
    from ..convert import roundtrip, roundtrip_markdown
    result = roundtrip(args.src, args.via_layout, tp=args.tp, ep=args.ep, pp=args.pp, pad_vocab=args.pad_vocab,
                       work_dir=args.work_dir, keep=args.keep, progress=True)
    options.write_report(args.report, roundtrip_markdown(result))
    options.write_json(args.json, {"passed": result.ok} | options.plain(result))
    for leg in result.legs:
        print(f"{leg.src_layout} -> {leg.dst_layout}: {leg.tensors} tensors, {leg.seconds:.2f} s, "
              f"{leg.gb_per_s:.2f} GB/s, peak RSS {leg.peak_rss_bytes / 2**20:.0f} MiB")
    bad = [d for d in result.diffs if not d.bit_exact]
    for d in bad[:20]:
        print(f"DIFFERS {d.name}: {d.dtype} {list(d.shape)}, max abs diff {d.max_abs_diff:.3g}")
    for n in result.missing:
        print(f"MISSING after the round trip: {n}")
    for n in result.extra:
        print(f"EXTRA after the round trip: {n}")
    for note in result.notes:
        print(f"note: {note}")
    exact = sum(d.bit_exact for d in result.diffs)
    print(f"{'PASS' if result.ok else 'FAIL'}: {exact}/{len(result.diffs)} tensors bit-exact"
          + (f"; report {args.report}" if args.report else ""))
    return 0 if result.ok else 1
