"""Start the ranks and run the sharded forward on each; rank 0 compares and reports.

Two ways in: `spawn(...)` starts tp·ep·pp processes itself (torch.multiprocessing, a free port on
loopback, tcp:// rendezvous), and `run_here(...)` joins a group that torchrun started (env://).
Every collective has the process group's timeout, spawned processes have an overall deadline,
and every process destroys its group on the way out, so nothing hangs.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..dtypes import DTYPES
from ..formats.megatron import legacy as megatron
from ..trace import Trace
from .check import Row, compare, first_failure
from .grid import Grid, make_groups
from .sharded import Stage


@dataclasses.dataclass
class Case:
    """One sharded forward to check: a Megatron checkpoint, its HF reference, a dtype."""
    megatron_dir: str
    reference_dir: str
    dtype: str = "float64"


@dataclasses.dataclass
class Config:
    cases: list[Case]
    backend: str = "gloo"
    seq: int = 32
    batch: int = 2
    seed: int = 0
    timeout_s: float = 120.0
    result_path: str | None = None  # rank 0 writes the results here as JSON
    threads: int = 1


@dataclasses.dataclass
class CaseResult:
    case: Case
    grid: tuple[int, int, int]
    rows: list[Row]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def first_failure(self) -> Row | None:
        return first_failure(self.rows)

    def to_json(self) -> dict:
        return {"case": dataclasses.asdict(self.case), "grid": list(self.grid), "ok": self.ok,
                "rows": [dataclasses.asdict(r) for r in self.rows]}

    @classmethod
    def from_json(cls, data: dict) -> "CaseResult":
        return cls(Case(**data["case"]), tuple(data["grid"]), [Row(**r) for r in data["rows"]])


def grid_of(megatron_dir: str | Path) -> Grid:
    lay = megatron.open_checkpoint(megatron_dir).layout
    return Grid(lay.tp, lay.ep, lay.pp)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- one rank -----------------------------------------------------------------------------------
def _device(backend: str) -> torch.device:
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(1, torch.cuda.device_count())))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def rank_main(rank: int, world: int, init_method: str, cfg: Config) -> list[CaseResult] | None:
    """Everything one rank does: join, run every case, leave. Rank 0 returns the results."""
    torch.set_num_threads(cfg.threads)
    dist.init_process_group(cfg.backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=cfg.timeout_s))
    try:
        device = _device(cfg.backend)
        results = [_run_case(case, rank, world, cfg, device) for case in cfg.cases]
        if rank == 0:
            if cfg.result_path:
                tmp = Path(cfg.result_path + ".tmp")
                tmp.write_text(json.dumps([r.to_json() for r in results]))
                tmp.replace(cfg.result_path)
            return results
        return None
    finally:
        dist.destroy_process_group()


def _run_case(case: Case, rank: int, world: int, cfg: Config, device) -> CaseResult | None:
    grid = grid_of(case.megatron_dir)
    if grid.world != world:
        raise ValueError(f"{case.megatron_dir}: tp={grid.tp} x ep={grid.ep} x pp={grid.pp} needs "
                         f"{grid.world} processes, got {world}")
    dtype = DTYPES[case.dtype]
    groups = make_groups(grid, rank)
    t, p, s = grid.coords(rank)
    meta, weights = megatron.load_rank(case.megatron_dir, tp_rank=t, ep_rank=p, pp_rank=s)
    spec = meta["spec"]
    stage = Stage(spec, meta["layout"], grid, groups, rank, weights, dtype, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, spec.vocab_size, (cfg.batch, cfg.seq), generator=gen).to(device)
    trace = Trace(device="cpu")
    logits = stage.forward(ids, trace)
    if logits is not None:
        trace.record("logits", logits)
    mine = trace.tensors if (t == 0 and p == 0) else None
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    verdict: list = [None]
    if rank == 0:
        ours: dict[str, torch.Tensor] = {}
        for part in gathered:
            if part:
                ours.update(part)
        ref = _reference_trace(case, spec, ids.cpu(), dtype)
        truth = _reference_trace(case, spec, ids.cpu(), torch.float64) if dtype != torch.float64 else None
        rows = compare(ours, ref, spec.num_layers, spec.vocab_size, dtype, truth)
        verdict = [CaseResult(case, (grid.tp, grid.ep, grid.pp), rows)]
    dist.barrier()
    return verdict[0]


def _reference_trace(case: Case, spec, ids: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The unsharded model from the reference checkpoint (HF normally; any layout we read), traced."""
    from ..formats import canonical
    from ..formats import layout as layouts
    from ..model import Transformer
    ref_spec, stream = layouts.module(layouts.detect(case.reference_dir)).read(case.reference_dir)
    a, b = dataclasses.replace(ref_spec, name=""), dataclasses.replace(spec, name="")
    if a != b:
        diff = [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
        raise ValueError(f"{case.reference_dir}: its config differs from the Megatron checkpoint's in {diff}")
    state = {n: v.to(dtype) for n, v in canonical.to_dense(stream)}
    model = Transformer.from_state_dict(spec, state)
    trace = Trace(device="cpu")
    with torch.no_grad():
        model(ids, trace=trace)
    return dict(trace.tensors)


# ---- starting ranks -----------------------------------------------------------------------------
def _spawned(rank: int, world: int, init_method: str, cfg: Config) -> None:
    rank_main(rank, world, init_method, cfg)


def spawn(cfg: Config, world: int | None = None, deadline_s: float | None = None) -> list[CaseResult]:
    """Start the ranks on this machine (loopback) and return rank 0's results."""
    import tempfile
    world = world or grid_of(cfg.cases[0].megatron_dir).world
    with tempfile.TemporaryDirectory(prefix="gptoss-sharded-") as tmp:
        cfg = dataclasses.replace(cfg, result_path=str(Path(tmp) / "result.json"))
        start_ranks(_spawned, (cfg,), world, deadline_s or cfg.timeout_s * (2 + len(cfg.cases)), "sharded forward")
        return [CaseResult.from_json(r) for r in json.loads(Path(cfg.result_path).read_text())]


def start_ranks(fn, args: tuple, world: int, deadline_s: float, what: str) -> None:
    """Run `fn(rank, world, init_method, *args)` in `world` spawned processes (a tcp:// rendezvous
    on a free loopback port) and wait for all of them: a rank that raises is reported by its last
    line, and past `deadline_s` every process still alive is killed."""
    import torch.multiprocessing as mp
    init = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.start_processes(fn, args=(world, init, *args), nprocs=world, join=False, start_method="spawn")
    limit = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > limit:
                raise TimeoutError(f"{what}: the {world} ranks did not finish in time")
    except mp.ProcessRaisedException as err:
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        raise ValueError(f"{what}: rank {err.error_index} failed: {lines[-1] if lines else err}") from None
    except mp.ProcessExitedException as err:
        raise ValueError(f"{what}: rank {err.error_index} exited with code {err.exit_code}") from None
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def run_here(cfg: Config) -> list[CaseResult] | None:
    """Join the group torchrun set up (env://); rank 0 returns the results, the others None."""
    return rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", cfg)
