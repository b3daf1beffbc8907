"""megatron-core's forward on a tp × ep grid, one process per rank, under its own `parallel_state`
(gloo on the CPU): every job of a list in one process group (starting processes that import
megatron-core is the cost), rank 0's whole trace of each handed back.

A grid of one runs in this process when no process group exists yet (and leaves none behind).
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
from pathlib import Path

import torch

from . import hooks, model as mmodel
from .placement import cpu_placement


@dataclasses.dataclass(frozen=True)
class Job:
    """One forward: our Megatron files (legacy per-rank or torch_dist, as written for this grid), a
    dtype name, and a negative control (`fault`: a key of `model.WEIGHT_FAULTS`, "window-W" or
    "bias-activation-fusion")."""
    checkpoint: str
    dtype: str = "float64"
    fault: str | None = None
    save_to: str | None = None  # after loading: megatron-core's own dist_checkpointing.save into this directory

    def variant(self) -> mmodel.Variant:
        return mmodel.Variant(window_minus=0 if self.fault == "window-W" else 1,
                              bias_activation_fusion=self.fault == "bias-activation-fusion")


FAULTS = (*mmodel.WEIGHT_FAULTS, "window-W", "bias-activation-fusion")


def check_grid(checkpoint: str | Path, tp: int, ep: int) -> None:
    """Refuse, naming the checkpoint, a grid its files cannot load at, before any process starts:
    legacy per-rank files load only at the grid they were written for (pp 1: the subject builds
    the whole model on every rank); torch_dist holds global tensors, which `dist_checkpointing.load`
    reshards to any grid that divides the KV heads, the experts and the stored vocabulary rows."""
    from ...formats import layout as layouts
    from ...formats.errors import CheckpointError
    from ...formats.megatron.files import Layout
    from . import LAYOUTS
    kind = layouts.detect(checkpoint)
    if kind not in LAYOUTS:
        raise CheckpointError(f"{checkpoint}: not a Megatron checkpoint (detected {kind})")
    fmt = layouts.module(kind)
    spec, opts = fmt.read_spec(checkpoint), fmt.options(checkpoint)
    if kind == "megatron" and (opts["tp"], opts["ep"], opts["pp"]) != (tp, ep, 1):
        raise CheckpointError(f"{checkpoint}: legacy per-rank files written for tp {opts['tp']} × ep {opts['ep']} × "
                              f"pp {opts['pp']} load only at that grid (asked: tp {tp} × ep {ep} × pp 1); "
                              "torch_dist (--to megatron-dist) loads at any")
    try:
        Layout(tp, ep).check(spec)
    except CheckpointError as err:
        raise CheckpointError(f"{checkpoint}: {err}") from None
    rows = Layout(opts["tp"], 1, 1, opts["pad_vocab"]).vocab(spec)
    if rows % tp:
        raise CheckpointError(f"{checkpoint}: its {rows} vocabulary rows do not split over tp {tp} "
                              f"(convert with --tp {tp} --pad-vocab)")


def _one(job: Job, tp: int, ep: int, t: int, p: int, ids: torch.Tensor, ps
         ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from ...formats import layout as layouts
    from ...formats.megatron import legacy
    kind = layouts.detect(job.checkpoint)
    fmt = layouts.module(kind)
    spec = fmt.read_spec(job.checkpoint)
    opts = fmt.options(job.checkpoint)
    padded = legacy.Layout(opts["tp"], 1, 1, opts["pad_vocab"]).vocab(spec)
    dtype = getattr(torch, job.dtype)
    model = mmodel.build_model(spec, dtype, padded, tp, ep, job.variant())
    cast = mmodel.cast_like_float16_module(model, dtype)
    if kind == "megatron-dist":
        mmodel.load_torch_dist(model, job.checkpoint)
    else:
        ck = legacy.open_checkpoint(job.checkpoint)
        mmodel.load_legacy(model, ck.files[(t, 0, p)], job.fault if job.fault in mmodel.WEIGHT_FAULTS else None)
    if job.save_to is not None:
        from megatron.core import dist_checkpointing
        Path(job.save_to).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, job.save_to)
    rec, undo = hooks.attach(model, spec.experts_per_token)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    try:
        with torch.no_grad():
            logits = model(ids, positions, None)
    finally:
        for u in undo:
            u()
    rec["logits"] = logits.detach()[..., :spec.vocab_size].clone()
    if tp > 1:
        hooks.gather_tp(rec, ps.get_tensor_model_parallel_group(), tp)
    return rec, cast


def rank_main(rank: int, world: int, init_method: str, grids: list[tuple[int, int, list[Job]]], ids: torch.Tensor,
              result_path: str, timeout_s: float = 300.0) -> None:
    """Everything one rank does, grid after grid (tp, ep, jobs; a grid smaller than the world
    runs with data-parallel replicas); rank 0 saves every job's trace, the parameters cast and the
    redirect counts to `result_path` (a temporary name, then renamed); a rank that fails leaves
    its last line in `result_path.rank{r}.error`."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    counts: collections.Counter = collections.Counter()
    try:
        from megatron.core import parallel_state as ps
        done = []
        with cpu_placement(counts):
            for tp, ep, jobs in grids:
                ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                             expert_tensor_parallel_size=1)
                try:
                    t, p = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
                    done += [_one(job, tp, ep, t, p, ids, ps) for job in jobs]
                finally:
                    ps.destroy_model_parallel()
        if rank == 0:
            tmp = Path(result_path + ".tmp")
            torch.save({"traces": [trace for trace, _ in done], "casts": [cast for _, cast in done],
                        "counts": dict(counts)}, tmp)
            tmp.replace(result_path)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        Path(f"{result_path}.rank{rank}.error").write_text(f"{type(err).__name__}: {lines[-1] if lines else ''}")
        raise
    finally:
        dist.destroy_process_group()


def run(jobs: list[Job], ids: torch.Tensor, tp: int = 1, ep: int = 1, deadline_s: float = 300.0):
    """(each job's trace, the placement redirects counted on rank 0, each job's parameters cast
    to its dtype as Float16Module casts them: name -> dtype before), on one tp × ep grid."""
    return run_grids([(tp, ep, jobs)], ids, deadline_s)


def run_grids(grids: list[tuple[int, int, list[Job]]], ids: torch.Tensor, deadline_s: float = 300.0
              ) -> tuple[list[dict[str, torch.Tensor]], dict[str, int], list[dict[str, str]]]:
    """Several grids (tp, ep, jobs) in one start of the ranks: the world is the largest grid, which
    every other one divides. Returns the traces of every job in order, the redirects, the casts."""
    import tempfile

    import torch.distributed as dist

    from ...distributed.launch import free_port, start_ranks
    world = max(tp * ep for tp, ep, _ in grids)
    if any(world % (tp * ep) for tp, ep, _ in grids):
        raise ValueError(f"megatron-core: every grid must divide the largest ({world} ranks)")
    for checkpoint, tp, ep in dict.fromkeys((job.checkpoint, tp, ep) for tp, ep, jobs in grids for job in jobs):
        check_grid(checkpoint, tp, ep)  # before any rank starts: one error naming the checkpoint
    with tempfile.TemporaryDirectory(prefix="gptoss-mcore-") as tmp:
        out = str(Path(tmp) / "result.pt")
        try:
            if world == 1 and not dist.is_initialized():
                rank_main(0, 1, f"tcp://127.0.0.1:{free_port()}", grids, ids, out)
            else:
                start_ranks(rank_main, (grids, ids, out), world, deadline_s, "megatron-core forward")
        except BaseException:
            errors = sorted(Path(tmp).glob("result.pt.rank*.error"))
            if not errors:
                raise
            rank = errors[0].name.split(".")[2]
            raise ValueError(f"megatron-core forward: {rank}: {errors[0].read_text()}") from None
        got = torch.load(out, weights_only=True)
    return got["traces"], got["counts"], got["casts"]
