"""The subject protocol: what any implementation of GPT-OSS answers so the harness can judge it.

A subject is any object with

    name: str                     # how reports call it
    precisions: tuple[str, ...]   # the dtypes it runs in ("float64", "float32", "bfloat16", ...)
    points: tuple[str, ...]       # the trace points it exposes, by point name (POINT_NAMES);
                                  # a per-layer point ("q") means that point of every layer
    def run(self, case: Case) -> Output | torch.Tensor   # a bare tensor is the logits
    floors: tuple[Floor, ...]     # optional: precision floors the subject states about itself

Given a `Case` (a ModelSpec, the weights as a canonical state dict or a checkpoint directory in
any layout we read, token ids [B, S] at absolute positions offset.., a dtype), `run` returns the
logits [B, S, V] and, where it can, trace points under our names (`layers.3.q`, `final_norm`, ...;
shapes in `point_shape`). A subject that cannot run a case (package missing, dtype or device it
does not support) raises `SubjectUnavailable` saying why. `validate_output` is the one check of
what a subject (or an engine's dump) hands back.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..config import ModelSpec
# the one import of the trace names in this package: every subject module takes them from here
from ..trace import LAYER_POINTS, Trace, layer_name, ordered_names, split_name

__all__ = ["Case", "Floor", "Output", "Subject", "SubjectError", "SubjectUnavailable", "POINT_NAMES", "LAYER_POINTS",
           "Trace", "layer_name", "ordered_names", "split_name", "point_shape", "point_names",
           "validate_output", "ALL_POINTS", "LOGITS_ONLY"]

GLOBAL_POINTS = ("embed", "final_norm", "logits")
#: every point name a subject may expose (`logits` is always required)
POINT_NAMES = ("embed", *LAYER_POINTS, "final_norm", "logits")
ALL_POINTS = POINT_NAMES
LOGITS_ONLY = ("logits",)
INTEGER_POINTS = ("topk_idx",)


class SubjectUnavailable(RuntimeError):
    """The subject cannot run here (a package missing, a dtype or device it does not support)."""


class SubjectError(ValueError):
    """A subject (or an engine's dump) handed back something malformed; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One forward to run. Exactly one of `state` (canonical HF names -> tensors, dense or MXFP4
    experts) and `checkpoint` (a directory in any layout we read) holds the weights."""
    spec: ModelSpec
    input_ids: torch.Tensor                  # [B, S] int64
    offset: int = 0                          # absolute position of input_ids[:, 0]
    dtype: torch.dtype = torch.float32       # what the subject should run in
    state: Mapping[str, torch.Tensor] | None = None
    checkpoint: str | Path | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if (self.state is None) == (self.checkpoint is None):
            raise ValueError("Case: give exactly one of state and checkpoint")
        if self.input_ids.dim() != 2 or self.input_ids.is_floating_point():
            raise ValueError(f"Case.input_ids: expected an integer [B, S] tensor, got "
                             f"{self.input_ids.dtype} {list(self.input_ids.shape)}")
        if self.offset < 0:
            raise ValueError(f"Case.offset: expected >= 0, got {self.offset}")

    @classmethod
    def random(cls, spec: ModelSpec, dtype: torch.dtype, batch: int = 8, seq: int = 24, offset: int = 0,
               seed: int = 0, device: str = "cpu") -> "Case":
        """The standard case of the matrix, the plugin and `case export`: random weights of the
        `typical` profile (every branch exercised, `weights.py`) with the experts on the MXFP4 grid
        (so subjects that load MXFP4, as OpenAI's and an MXFP4 checkpoint do, run the same model),
        random token ids. Seeded: the same arguments give the same case."""
        from ..formats import canonical
        from ..weights import random_weights
        ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed + 1))
        state = dict(canonical.to_mxfp4(random_weights(spec, seed, "typical", torch.float32).items()))
        return cls(spec, ids, offset, dtype, state, device=device)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def dense_state(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The weights as canonical dense tensors in `dtype` (default: the case's) on the case's
        device: MXFP4 experts decoded (exactly), a checkpoint read through its layout."""
        from ..formats import canonical
        from ..formats import layout as layouts
        dtype = dtype or self.dtype
        if self.state is not None:
            stream = iter(self.state.items())
        else:
            _, stream = layouts.module(layouts.detect(self.checkpoint)).read(self.checkpoint)
        return {n: (t.to(device=self.device, dtype=dtype) if t.is_floating_point() else t.to(self.device))
                for n, t in canonical.to_dense(stream, dtype)}

    def positions(self) -> torch.Tensor:
        """[B, S] absolute positions."""
        b, s = self.input_ids.shape
        return torch.arange(self.offset, self.offset + s).expand(b, s)


@dataclasses.dataclass(frozen=True)
class Floor:
    """A precision floor a subject states about itself (optional attribute `floors`, a tuple of
    these): in `dtype`, every point from the first `start` point on (a point name, e.g.
    `topk_weights`) is judged by the tolerance kind `kind` instead of the default; `why` cites the
    subject's own source. The verdict lists the floors that applied."""
    dtype: str
    start: str
    kind: str
    why: str


@dataclasses.dataclass
class Output:
    """What a subject returns: logits [B, S, V] and any trace points under our names."""
    logits: torch.Tensor
    points: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@runtime_checkable
class Subject(Protocol):
    name: str
    precisions: tuple[str, ...]
    points: tuple[str, ...]

    def run(self, case: Case) -> Output | torch.Tensor: ...


def point_names(spec: ModelSpec, points: tuple[str, ...]) -> list[str]:
    """The full trace names (in trace order) of the given point names for this spec."""
    wanted = set(points)
    return [n for n in ordered_names(spec.num_layers) if split_name(n)[1] in wanted]


def point_shape(spec: ModelSpec, batch: int, seq: int, name: str) -> tuple[int, ...]:
    """The shape of trace point `name` for a [batch, seq] input: q/k/v [B, S, heads, head_dim]
    (after RoPE), attn_core [B, S, heads·head_dim], router_logits [B, S, E], topk_* [B, S, k],
    logits [B, S, V], every other point [B, S, hidden]."""
    layer, point = split_name(name)
    if point not in POINT_NAMES or (layer is None) != (point in GLOBAL_POINTS) or \
            (layer is not None and not 0 <= layer < spec.num_layers):
        raise SubjectError(f"{name}: not a trace point of this model (points: {', '.join(POINT_NAMES)}, "
                           f"layers 0..{spec.num_layers - 1})")
    b_s = (batch, seq)
    return b_s + {
        "q": (spec.num_heads, spec.head_dim), "k": (spec.num_kv_heads, spec.head_dim),
        "v": (spec.num_kv_heads, spec.head_dim), "attn_core": (spec.num_heads * spec.head_dim,),
        "router_logits": (spec.num_experts,), "topk_idx": (spec.experts_per_token,),
        "topk_weights": (spec.experts_per_token,), "logits": (spec.vocab_size,),
    }.get(point, (spec.hidden_size,))


def validate_output(output: Output | torch.Tensor | Mapping[str, torch.Tensor], case: Case,
                    where: str = "subject") -> Output:
    """The subject's answer as an `Output`, or one SubjectError naming the field that is wrong:
    missing logits, an unknown name, a wrong shape or dtype, NaN or infinity. A mapping is read
    as a dump (`logits` plus points)."""
    if isinstance(output, torch.Tensor):
        output = Output(output)
    elif isinstance(output, Mapping):
        if "logits" not in output:
            raise SubjectError(f"{where}: no 'logits' tensor (has {sorted(output) or 'nothing'})")
        output = Output(output["logits"], {n: t for n, t in output.items() if n != "logits"})
    elif not isinstance(output, Output):
        raise SubjectError(f"{where}: run() returned {type(output).__name__}; expected an Output or a logits tensor")
    b, s = case.input_ids.shape
    tensors = {"logits": output.logits, **output.points}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise SubjectError(f"{where}: {name} is a {type(t).__name__}, expected a tensor")
        expected = point_shape(case.spec, b, s, name)  # raises for an unknown name
        if tuple(t.shape) != expected:
            raise SubjectError(f"{where}: {name} has shape {list(t.shape)}, expected {list(expected)}")
        if split_name(name)[1] in INTEGER_POINTS:
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise SubjectError(f"{where}: {name} has dtype {t.dtype}, expected an integer dtype")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= case.spec.num_experts):
                raise SubjectError(f"{where}: {name} holds expert ids outside 0..{case.spec.num_experts - 1}")
            continue
        if not t.is_floating_point():
            raise SubjectError(f"{where}: {name} has dtype {t.dtype}, expected a floating dtype")
        bad = ~torch.isfinite(t)
        if bad.any():
            first = [int(i) for i in bad.nonzero()[0]]
            kind = "NaN" if torch.isnan(t).any() else "infinity"
            raise SubjectError(f"{where}: {name} holds {kind} ({int(bad.sum())} element(s), first at {first})")
    return Output(output.logits.detach(), {n: t.detach() for n, t in output.points.items()})

