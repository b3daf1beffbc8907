"""One parity case end to end: weights, tokens, the oracle, ours, the float64 truth, the comparisons."""
from __future__ import annotations

import dataclasses
import time

import torch

from .. import metrics
from ..backends import block_functions
from ..config import ModelSpec
from ..model import Transformer
from ..trace import Trace
from ..weights import random_weights
from . import streaming
from .compare import (FREE, TEACHER, Float64Shadow, FreeRunning, PointResult, clamp_active_share,
                      first_divergence, router_tie_count, teacher_forced)


@dataclasses.dataclass
class ParityCase:
    spec: ModelSpec
    dtype: torch.dtype = torch.float64
    profile: str = "typical"
    seed: int = 0
    batch: int = 2
    seq: int = 40
    offset: int = 0
    device: str = "cpu"
    backend: str = "reference"
    faults: tuple[str, ...] = ()
    weights_source: str = "random"
    stream_layers: bool = False  # one decoder layer's weights on the device at a time (streaming.py)


@dataclasses.dataclass
class ParityResult:
    case: ParityCase
    rows: list[PointResult]
    first_divergence: PointResult | None
    clamp_share: float
    router_ties: int
    routing_agreement: float
    argmax_agreement: float
    kl_ours: float
    tie_tokens_excluded: int
    seconds: float
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # where the time went

    @property
    def passed(self) -> bool:
        return self.first_divergence is None


def run_case(case: ParityCase, state: dict[str, torch.Tensor] | None = None) -> ParityResult:
    """Run one case. `state` (canonical dense tensors) overrides the random weights; it is shared
    by ours and the oracle, never copied (cast only where its dtype differs from the case's)."""
    from ..oracles.hf import HFOracle  # the only import of transformers, kept out of module load

    start = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(phase: str) -> None:
        nonlocal start
        if case.device.startswith("cuda"):
            torch.cuda.synchronize()
        now = time.perf_counter()
        phases[phase] = now - start
        start = now

    spec = case.spec
    stream = None
    if case.stream_layers:
        load = (streaming.random_source(spec, case.seed, case.profile, case.dtype, case.device) if state is None
                else streaming.state_source(state, case.dtype, case.device))
        stream = streaming.LayerWeights(spec, load, case.device)
        state = streaming.meta_layers(spec, load(list(streaming.RESIDENT)), case.dtype)
    elif state is None:
        state = random_weights(spec, case.seed, case.profile, case.dtype, case.device)
    else:
        state = {n: t.to(device=case.device, dtype=case.dtype) if t.is_floating_point() else t
                 for n, t in state.items()}
    ours = Transformer.from_state_dict(spec, state, block_functions(case.backend, case.faults))
    oracle = HFOracle(spec, state)
    layer_params = None
    if stream is not None:
        stream.attach(ours.model.layers)
        stream.attach(oracle.model.model.layers)
        layer_params = stream.params
    lap("weights and models")
    gen = torch.Generator().manual_seed(case.seed + 1)
    ids = torch.randint(0, spec.vocab_size, (case.batch, case.seq), generator=gen).to(case.device)

    oracle_trace, ours_trace = Trace(), Trace()
    with torch.no_grad():
        oracle(ids, case.offset, oracle_trace)
        lap("oracle forward")
        ours(ids, case.offset, trace=ours_trace)
        lap("our forward")
    shadow = Float64Shadow(ours, layer_params) if case.dtype != torch.float64 else None
    rows, excluded = teacher_forced(ours, oracle_trace, case.offset, case.dtype, shadow)
    lap("teacher-forced comparison")
    free = FreeRunning(ours_trace, oracle_trace, case.dtype, case.device)
    if shadow is None:
        rows += free.without_truth(spec.num_layers)
    else:
        with torch.no_grad():
            shadow.forward(ids, case.offset, free)
        rows += free.rows
    lap("free-running comparison")
    idx_agree = [metrics.set_agreement(ours_trace[n], oracle_trace[n]) for n in ours_trace.names()
                 if n.endswith("topk_idx")]
    result = ParityResult(
        case=case, rows=rows, first_divergence=first_divergence(rows, spec.num_layers),
        clamp_share=clamp_active_share(ours, ours_trace, layer_params),
        router_ties=router_tie_count(oracle_trace, spec.num_layers, spec.experts_per_token, case.dtype),
        routing_agreement=min(idx_agree) if idx_agree else 1.0,
        argmax_agreement=free.argmax_agreement, kl_ours=free.mean_kl,
        tie_tokens_excluded=excluded, seconds=0.0, phases=phases)
    lap("summary statistics")
    result.seconds = sum(phases.values())
    if stream is not None:
        stream.release()
        phases[f"of which drawing {stream.draws} layers"] = stream.seconds  # inside the phases above
    return result


__all__ = ["ParityCase", "ParityResult", "run_case", "TEACHER", "FREE"]
