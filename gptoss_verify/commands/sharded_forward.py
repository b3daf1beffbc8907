"""`gptoss-verify sharded-forward MEGATRON_DIR --reference HF_DIR`: run the Megatron shards as
Megatron would (tp·ep·pp processes, each reading only its own file) and compare every layer
boundary and the logits with the unsharded model. Spawns its processes itself, or runs as one rank
under torchrun. Exit 1 on any mismatch."""
from __future__ import annotations

import argparse
import sys

from ..distributed.launch import Case, CaseResult, Config, grid_of, run_here, spawn, under_torchrun
from ..report import environment, table
from ..tolerances import tolerance
from . import options

NAME = "sharded-forward"
HELP = "run Megatron shards over torch.distributed, compare with the unsharded model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("megatron_dir", help="a Megatron legacy checkpoint (gptoss-verify convert --to megatron)")
    p.add_argument("--reference", required=True, help="the HF checkpoint it was converted from")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    options.add_dtype(p, default="float64")
    p.add_argument("--seq", type=options.positive_int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--batch", type=options.positive_int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the random input tokens")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any collective may wait")
    options.add_report(p)
    options.add_json(p)


def run(args: argparse.Namespace) -> int:
    cfg = Config([Case(args.megatron_dir, args.reference, args.dtype)], backend=args.backend, seq=args.seq,
                 batch=args.batch, seed=args.seed, timeout_s=args.timeout)
    if under_torchrun():
        results = run_here(cfg)
        if results is None:  # not rank 0: rank 0 reports
            return 0
    else:
        grid_of(args.megatron_dir)  # a bad checkpoint fails here, before any process starts
        results = spawn(cfg)
    result = results[0]
    options.write_report(args.report, markdown(result, cfg))
    options.write_json(args.json, {"passed": result.ok, "grid": result.grid, "case": result.case,
                                   "rows": result.rows})
    bad = result.first_failure
    if bad is None:
        worst = max((r.measure for r in result.rows if r.kind == "relative max error"), default=0.0)
        print(f"sharded forward tp={result.grid[0]} ep={result.grid[1]} pp={result.grid[2]} {args.dtype}: "
              f"PASS ({len(result.rows)} points, worst relative error {worst:.3g})")
        return 0
    print(f"sharded forward tp={result.grid[0]} ep={result.grid[1]} pp={result.grid[2]} {args.dtype}: "
          f"FAIL at {bad.name} ({bad.kind} {bad.measure:.3g} > {bad.limit:.3g}{'; ' + bad.note if bad.note else ''})",
          file=sys.stderr)
    return 1


def markdown(result: CaseResult, cfg: Config) -> str:
    tp, ep, pp = result.grid
    dtype = result.case.dtype
    bad = result.first_failure
    lines = [f"# Sharded forward: Megatron tp={tp} ep={ep} pp={pp} against the unsharded model", "",
             f"**Verdict: {'PASS' if bad is None else 'FAIL'}**" + ("" if bad is None else
             f" — first divergence at `{bad.name}` ({bad.kind} {bad.measure:.3g}, limit {bad.limit:.3g})"), "",
             f"Megatron checkpoint: `{result.case.megatron_dir}`; reference: `{result.case.reference_dir}`; "
             f"{tp * ep * pp} ranks over `{cfg.backend}`; dtype {dtype}; batch {cfg.batch} x {cfg.seq} tokens "
             f"(seed {cfg.seed}).", "",
             f"Tolerance (tolerances.py): sharded {tolerance(dtype, 'sharded').limit:g} "
             f"({tolerance(dtype, 'sharded').reason}); routing agreement >= {tolerance(dtype, 'routing').limit:g}."
             + ("" if dtype == "float64" else
                f" Below float64 a point over the sharded limit still passes by the truth rule: its error against "
                f"the float64 unsharded run is at most {tolerance(dtype, 'truth').factor:g}x the unsharded {dtype} "
                f"run's own plus {tolerance(dtype, 'truth').limit:.3g} (see the note column)."), "",
             "## Environment", "", table(list(environment(cfg.backend == 'nccl' and 'cuda' or 'cpu').items()), ["", ""]), "",
             "## Points", "",
             table([(f"`{r.name}`", r.kind, f"{r.measure:.3g}", f"{r.limit:.3g}", "yes" if r.ok else "NO", r.note)
                    for r in result.rows], ["point", "measure", "value", "limit", "ok", "note"]), ""]
    return "\n".join(lines)
