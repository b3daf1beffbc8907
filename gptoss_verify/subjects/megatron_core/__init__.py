"""megatron-core as a subject: its own `GPTModel` (local layer spec), loaded from the files we
write, run under its own `parallel_state`, traced by our names (`hooks.py`).

    gptoss-verify matrix --subject megatron-core        (tp 1, our legacy files, TE names)

The case's weights are written by our converter (`--to megatron` with TE or local names, or
`--to megatron-dist`) for the subject's tp × ep grid; each rank loads its legacy file with
`load_state_dict(strict=True)` or the torch_dist directory through megatron-core's
`dist_checkpointing.load` (default strictness). On the CPU its CUDA placement requests are
redirected and counted (`placement.py`); `redirects` holds the last run's counts. The local
spec builds its RMSNorm weights in float32 whatever the dtype; the model is cast to the case's dtype
as Megatron-LM's `Float16Module` casts it for bf16 (`casts` lists what was cast).

Megatron-Core's floors and quirks, stated rather than hidden (`FLOORS`; docs/megatron-core.md):
its router computes the top-k softmax in float32 whatever the model dtype, so in float64 every
point from the first `topk_weights` on is judged by the `router-float32` row; with
`bias_activation_fusion=True` its local SequentialMLP clamps before the fc1 bias (the subject
builds with False; `fault="bias-activation-fusion"` builds it the other way, a negative control).
Its YaRN RoPE starts at position 0 (no offset without an inference context): a case with an offset
is refused.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..protocol import ALL_POINTS, Case, Floor, Output, SubjectUnavailable

ROUTER_FLOAT32 = Floor(
    dtype="float64", start="topk_weights", kind="router-float32",
    why="megatron-core's top-k softmax is float32 in any dtype (transformer/moe/moe_utils.py, "
        "topk_routing_with_score_function: \"All the intermediate calculations are in fp32\")")
FLOORS = (ROUTER_FLOAT32,)
LAYOUTS = ("megatron", "megatron-dist")


def available() -> str | None:
    """None when megatron-core imports, else why not."""
    try:
        import megatron.core  # noqa: F401
        from megatron.core.models.gpt import GPTModel  # noqa: F401
    except ImportError as err:
        return (f"megatron-core needs the megatron-core package (pip install --no-deps "
                f"--ignore-requires-python megatron-core==0.19.2): {err}")
    return None


def write_files(state, spec, out: str | Path, layout: str = "megatron", names: str = "te", tp: int = 1,
                ep: int = 1, pad_vocab: bool = False) -> Path:
    """The weights as our converter writes them for this grid."""
    from ...formats import layout as layouts
    if layout not in LAYOUTS:
        raise ValueError(f"megatron-core: layout expected one of {LAYOUTS}, got {layout!r}")
    extra = {"names": names} if layout == "megatron" else {}
    layouts.module(layout).write(state, spec, out, tp=tp, ep=ep, pad_vocab=pad_vocab, **extra)
    return Path(out)


class MegatronCore:
    def __init__(self, tp: int = 1, ep: int = 1, layout: str = "megatron", names: str = "te",
                 pad_vocab: bool = False, fault: str | None = None):
        why = available()
        if why is not None:
            raise SubjectUnavailable(why)
        from . import ranks
        if fault is not None and fault not in ranks.FAULTS:
            raise ValueError(f"megatron-core: fault expected one of {ranks.FAULTS}, got {fault!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"megatron-core: layout expected one of {LAYOUTS}, got {layout!r}")
        self.tp, self.ep, self.layout, self.names, self.pad_vocab, self.fault = tp, ep, layout, names, pad_vocab, fault
        grid = "" if tp * ep == 1 else f" tp{tp}×ep{ep}"
        self.name = f"megatron-core{grid}" + ("" if fault is None else f" ({fault})")
        self.precisions = ("float64", "float32", "bfloat16")
        self.points = ALL_POINTS
        self.floors = FLOORS
        self.redirects: dict[str, int] = {}
        self.casts: dict[str, str] = {}  # parameters megatron-core built in another dtype, cast (last run)

    def run(self, case: Case) -> Output:
        return self.run_many([case])[0]

    def run_many(self, cases: list[Case], faults: list[str | None] | None = None) -> list[Output]:
        """Several cases (and negative controls) in one process group: one start of the ranks."""
        from . import ranks
        faults = faults or [self.fault] * len(cases)
        for case in cases:
            if case.offset:
                raise SubjectUnavailable("megatron-core: no position offset (its YaRN RoPE starts at position 0 "
                                         "without an inference context)")
            if case.dtype_name not in self.precisions:
                raise SubjectUnavailable(f"megatron-core: runs in {', '.join(self.precisions)}, not {case.dtype_name}")
        ids = cases[0].input_ids
        if any(not torch.equal(c.input_ids, ids) for c in cases):
            raise ValueError("megatron-core: run_many needs the same input ids in every case")
        with tempfile.TemporaryDirectory(prefix="gptoss-mcore-files-") as tmp:
            jobs = []
            for j, (case, fault) in enumerate(zip(cases, faults)):
                out = write_files(case.dense_state(), case.spec, Path(tmp) / f"case{j}", self.layout, self.names,
                                  self.tp, self.ep, self.pad_vocab)
                jobs.append(ranks.Job(str(out), case.dtype_name, fault))
            traces, self.redirects, casts = ranks.run(jobs, ids.cpu(), self.tp, self.ep)
        self.casts = casts[-1]
        return [Output(t.pop("logits"), t) for t in traces]


def subject(**options) -> MegatronCore:
    """The registry's entry (`megatron-core`): options tp, ep, layout, names, pad_vocab, fault."""
    return MegatronCore(**options)
