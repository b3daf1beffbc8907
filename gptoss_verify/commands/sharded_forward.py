"""`gptoss-verify sharded-forward MEGATRON_DIR --reference HF_DIR`: run the Megatron shards as
Megatron would (tp·ep·pp processes, each reading only its own file) and compare every layer
boundary and the logits with the unsharded model. Spawns its processes itself, or runs as one rank
under torchrun. Exit 1 on any mismatch.

`--engine megatron-core` runs megatron-core's own GPTModel on the same files instead of our sharded
forward (`subjects/megatron_core`: its parallel_state over gloo, legacy files loaded with
`load_state_dict(strict=True)` at their grid, torch_dist through `dist_checkpointing.load` at the
grid it was converted for or at `--tp/--ep`, resharded from its global tensors) and judges every
trace point against our float64 truth on the reference, naming the first divergence and the
Megatron-Core floors that applied."""
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
    p.add_argument("megatron_dir", help="a Megatron checkpoint: legacy (gptoss-verify convert --to megatron), or torch_dist "
                        "(--to megatron-dist) with --engine megatron-core")
    p.add_argument("--reference", required=True, help="the HF checkpoint it was converted from")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--engine", choices=("ours", "megatron-core"), default="ours",
                   help="whose forward runs on the shards: our sharded model (default) or megatron-core's GPTModel "
                        "(gloo on the CPU; the grid is the checkpoint's)")
    p.add_argument("--tp", type=options.positive_int, default=None,
                   help="with --engine megatron-core: the tensor-parallel size to load a torch_dist checkpoint at "
                        "(its tensors are global; default: the grid it was converted for); legacy files load at "
                        "their own grid only")
    p.add_argument("--ep", type=options.positive_int, default=None,
                   help="with --engine megatron-core: the expert-parallel size, likewise")
    options.add_dtype(p, default="float64")
    p.add_argument("--seq", type=options.positive_int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--batch", type=options.positive_int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the random input tokens")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any collective may wait")
    options.add_report(p)
    options.add_json(p)


def run(args: argparse.Namespace) -> int:
    if args.engine == "megatron-core":
        return run_megatron_core(args)
    if args.tp is not None or args.ep is not None:  # our sharded forward runs the files' own grid
        print("gptoss-verify sharded-forward: error: --tp/--ep choose the grid of --engine megatron-core only "
              "(our sharded forward runs the legacy files' own grid)", file=sys.stderr)
        return 2
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


def run_megatron_core(args: argparse.Namespace) -> int:
    import torch

    from ..formats import layout as layouts
    from ..formats.errors import CheckpointError
    from ..subjects.judging import judge_output
    from ..subjects.megatron_core import MegatronCore, ranks
    from ..subjects.protocol import Case, SubjectUnavailable
    kind = layouts.detect(args.megatron_dir)
    if kind not in ("megatron", "megatron-dist"):
        raise CheckpointError(f"{args.megatron_dir}: not a Megatron checkpoint (detected {kind})")
    fmt = layouts.module(kind)
    spec, opts = fmt.read_spec(args.megatron_dir), fmt.options(args.megatron_dir)
    tp = args.tp if args.tp is not None else opts["tp"]
    ep = args.ep if args.ep is not None else opts["ep"]
    ids = torch.randint(0, spec.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    dtype = getattr(torch, args.dtype)
    case = Case(spec, ids, dtype=dtype, checkpoint=args.reference)
    try:
        subject = MegatronCore(tp=tp, ep=ep, layout=kind, pad_vocab=opts["pad_vocab"])
    except SubjectUnavailable as err:
        raise CheckpointError(str(err)) from None
    (trace,), redirects, casts = ranks.run([ranks.Job(str(args.megatron_dir), args.dtype)], ids, tp, ep,
                                           deadline_s=args.timeout)
    from ..subjects.protocol import Output
    verdict = judge_output(Output(trace.pop("logits"), trace), case, subject.points, subject.name, floors=subject.floors)
    bad = verdict.first_failure
    head = f"megatron-core forward tp={tp} ep={ep} on {kind} {args.dtype}"
    lines = [f"# {head}", "", f"**Verdict: {'PASS' if bad is None else 'FAIL'}**"
             + ("" if bad is None else f" — first divergence at `{bad.name}`: {bad.verdict}"), "",
             "Megatron-Core floors that applied: " + ("; ".join(verdict.floors) or "none"), "",
             "CUDA placement requests redirected to the CPU (placement only): "
             + (", ".join(f"{k} ×{n}" for k, n in sorted(redirects.items())) or "none"), "",
             f"Parameters megatron-core built in another dtype, cast as Float16Module casts them: {len(casts)}", "",
             table([(f"`{c.name}`", c.verdict.kind, f"{c.verdict.error:.3g}", f"{c.verdict.bound:.3g}",
                     "yes" if c.verdict.passed else "NO") for c in verdict.cells],
                   ["point", "kind", "error", "bound", "ok"]), ""]
    options.write_report(args.report, "\n".join(lines))
    options.write_json(args.json, {"passed": bad is None, "engine": "megatron-core", "grid": [tp, ep],
                                   "floors": verdict.floors, "redirects": redirects,
                                   "cells": {c.name: c.verdict for c in verdict.cells}})
    for floor in verdict.floors:
        print(f"note: megatron-core floor: {floor}")
    if bad is None:
        print(f"{head}: PASS ({len(verdict.cells)} points judged against the float64 truth)")
        return 0
    print(f"{head}: FAIL at {bad.name}: {bad.verdict}", file=sys.stderr)
    return 1
