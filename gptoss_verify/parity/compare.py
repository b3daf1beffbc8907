"""Teacher-forced per-layer and free-running end-to-end comparison of ours against the oracle.

Teacher forcing feeds each of our layers the oracle's input of that layer, so a divergence is
located at the first (layer, point) where it appears instead of being smeared over every later
layer. In float64 ours and the oracle are compared directly. In a low precision our float64
reference, fed the same inputs, is the truth; `judge.py` decides each point by the rows of
`tolerances.py`.
The truth is evaluated one layer at a time (`Float64Shadow`), so a full-width model never needs a
float64 copy of all its weights.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from .. import metrics
from ..judge import Verdict, check
from ..model.model import REFERENCE, DecoderLayer, Transformer
from ..trace import LAYER_POINTS, Trace, layer_name, ordered_names, split_name

TEACHER, FREE = "teacher-forced", "free-running"
# Points computed in float32 from the teacher-forced input itself and rounded once.
ROUNDED_ONCE = ("attn_norm", "final_norm")
NARROW = (torch.bfloat16, torch.float16)
# Points downstream of the expert choice: tokens whose chosen set differs between ours and the
# oracle (an implementation-defined near-tie) are left out of these comparisons and counted.
AFTER_ROUTING = ("topk_weights", "mlp_out", "resid_mlp")


@dataclasses.dataclass
class PointResult:
    mode: str
    name: str
    kind: str
    measure: float          # ours' error, or agreement for `routing`
    oracle_measure: float   # the oracle's error against the truth (truth rule), else nan
    bound: float
    passed: bool
    max_abs: float = math.nan
    rel_l2: float = math.nan
    cosine: float = math.nan
    max_ulp: float = math.nan

    @property
    def layer(self) -> int | None:
        return split_name(self.name)[0]

    @property
    def point(self) -> str:
        return split_name(self.name)[1]


LayerParams = Callable[[int], dict[str, torch.Tensor]]


def model_layer_params(model: Transformer) -> LayerParams:
    """Layer i's parameters as the model holds them, named as inside the layer module."""
    return lambda i: {n: p.detach() for n, p in model.model.layers[i].named_parameters()}


class Float64Shadow:
    """Our model's layers re-run in float64 on demand, one layer's weights widened at a time.
    `layer_params` gives a layer's narrow parameters (default: the model's own; streamed runs pass
    `LayerWeights.params`)."""

    def __init__(self, model: Transformer, layer_params: LayerParams | None = None):
        self.model = model
        self.spec = model.spec
        self.layer_params = layer_params or model_layer_params(model)

    def _params(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's parameters in float64, except the experts: those stay narrow and are widened
        one expert at a time as they are used (`model.moe.experts`), so no float64 copy of a
        full-width layer's experts is ever made."""
        return {n: p if n.startswith("mlp.experts.") else p.to(torch.float64)
                for n, p in self.layer_params(layer).items()}

    def layer_forward(self, layer: int, x: torch.Tensor, start_pos: int, trace: Trace | None,
                      mlp_input: torch.Tensor | None = None) -> torch.Tensor:
        with torch.device("meta"):
            block = DecoderLayer(self.spec, layer)
        block.load_state_dict(self._params(layer), strict=True, assign=True)
        from ..model.rope import cos_sin
        cos, sin = cos_sin(self.spec, torch.arange(start_pos, start_pos + x.shape[1], device=x.device),
                           torch.float64, self.model.angle_dtype)
        return block(x.to(torch.float64), cos, sin, start_pos, None, REFERENCE, trace,
                     None if mlp_input is None else mlp_input.to(torch.float64))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens.weight.detach()[input_ids].to(torch.float64)

    def head(self, x: torch.Tensor, trace) -> torch.Tensor:
        from ..model.norm import rms_norm
        h = rms_norm(x.to(torch.float64), self.model.model.norm.weight.detach().double(), self.spec.rms_norm_eps)
        if trace is not None:
            trace.record("final_norm", h)
        logits = h @ self.model.lm_head.weight.detach().double().T
        if trace is not None:
            trace.record("logits", logits)
        return logits

    def forward(self, input_ids: torch.Tensor, start_pos: int, trace) -> torch.Tensor:
        """The whole model in float64; `trace` is a Trace or anything with `record(name, tensor)`."""
        x = self.embed(input_ids)
        if trace is not None:
            trace.record("embed", x)
        for i in range(self.spec.num_layers):
            x = self.layer_forward(i, x, start_pos, trace)
        return self.head(x, trace)


def compare_point(mode: str, name: str, ours: torch.Tensor, oracle: torch.Tensor,
                  truth: torch.Tensor | None, dtype: torch.dtype, judged: bool = True,
                  tokens: torch.Tensor | None = None, device: str | torch.device = "cpu") -> list[PointResult]:
    """One or two rows for one point: the main rule, plus the rounding rule where it applies.
    `judged=False` reports the measures without a verdict (kind `drift`); `tokens` [B, S] bool
    restricts the comparison to those tokens; the arithmetic runs on `device`."""
    point = split_name(name)[1]
    if tokens is not None:
        ours, oracle = ours[tokens], oracle[tokens]
        truth = None if truth is None else truth[tokens]
    if not ours.is_floating_point():
        return [_row(mode, name, check("routing", dtype, ours, oracle), judged)]
    vs_oracle = metrics.summarize(ours, oracle, dtype, device)
    stats = dict(max_abs=vs_oracle.max_abs, rel_l2=vs_oracle.rel_l2, cosine=vs_oracle.cosine,
                 max_ulp=vs_oracle.max_ulp)
    if truth is None:
        return [_row(mode, name, check("oracle", dtype, ours, oracle, device=device), **stats)]
    rows = [_row(mode, name, check("truth", dtype, ours, truth, oracle, device=device), judged, **stats)]
    if judged and mode == TEACHER and point in ROUNDED_ONCE and dtype in NARROW:
        rows.append(_row(mode, name, check("rounding", dtype, ours, truth, oracle)))
    return rows


def _row(mode: str, name: str, v: Verdict, judged: bool = True, **stats: float) -> PointResult:
    if not judged:  # drift: the measures, no verdict
        return PointResult(mode, name, "drift", v.error, v.reference, math.nan, True, **stats)
    return PointResult(mode, name, v.kind, v.error, v.reference, v.bound, v.passed, **stats)


def teacher_forced(ours: Transformer, oracle_trace: Trace, start_pos: int, dtype: torch.dtype,
                   shadow: Float64Shadow | None) -> tuple[list[PointResult], int]:
    """Each of our attention blocks fed the oracle's input of that layer, each MLP block the
    oracle's residual after attention, the head its final residual. Returns the rows and the
    number of tokens left out after routing (near-ties chosen differently by the two sides)."""
    rows: list[PointResult] = []
    excluded = 0
    n = ours.spec.num_layers
    device = ours.lm_head.weight.device
    for i in range(n):
        x = oracle_trace[layer_name(i, "input")].to(device)
        mid = oracle_trace[layer_name(i, "resid_attn")].to(device)
        mine, true = Trace(), Trace() if shadow else None
        with torch.no_grad():
            ours.layer_forward(i, x, start_pos, mine, mlp_input=mid)
            if shadow:
                shadow.layer_forward(i, x, start_pos, true, mlp_input=mid)
        idx = layer_name(i, "topk_idx")
        same_choice = metrics.same_expert_set(mine[idx], oracle_trace[idx])
        excluded += int((~same_choice).sum())
        for point in LAYER_POINTS[1:]:
            name = layer_name(i, point)
            rows += compare_point(TEACHER, name, mine[name], oracle_trace[name], true[name] if true else None,
                                  dtype, tokens=same_choice if point in AFTER_ROUTING else None, device=device)
    x = oracle_trace[layer_name(n - 1, "resid_mlp")].to(device)
    mine, true = Trace(), Trace() if shadow else None
    with torch.no_grad():
        ours.head(x, mine)
        if shadow:
            shadow.head(x, true)
    for name in ("final_norm", "logits"):
        rows += compare_point(TEACHER, name, mine[name], oracle_trace[name], true[name] if true else None, dtype,
                              device=device)
    return rows, excluded


class FreeRunning:
    """The free-running comparison. Ours and the oracle have each run end to end; the float64
    truth (if any) is fed in point by point as `Float64Shadow.forward` computes it (this object
    stands in for its trace), and each point is compared at once, so the truth is never stored
    whole. Then the next-token distributions are judged by the truth rule (median KL)."""

    def __init__(self, ours_trace: Trace, oracle_trace: Trace, dtype: torch.dtype,
                 device: str | torch.device = "cpu"):
        self.ours, self.oracle, self.dtype, self.device = ours_trace, oracle_trace, dtype, device
        self.rows: list[PointResult] = []
        self.argmax_agreement = math.nan  # ours against the truth (or the oracle in float64)
        self.mean_kl = math.nan

    def record(self, name: str, truth: torch.Tensor) -> None:
        """One point of the truth: compare it with ours and the oracle (reported as drift)."""
        if split_name(name)[1] == "input":
            return
        self.rows += compare_point(FREE, name, self.ours[name], self.oracle[name], truth, self.dtype,
                                   judged=False, device=self.device)
        if name == "logits":
            self._judge_logits(truth)

    def without_truth(self, num_layers: int) -> list[PointResult]:
        """Float64: ours against the oracle directly, every point judged."""
        for name in ordered_names(num_layers):
            if split_name(name)[1] != "input":
                self.rows += compare_point(FREE, name, self.ours[name], self.oracle[name], None, self.dtype,
                                           device=self.device)
        self._summarize_logits(self.oracle["logits"])
        return self.rows

    def _judge_logits(self, truth: torch.Tensor) -> None:
        v = check("free-logits", self.dtype, self.ours["logits"], truth, self.oracle["logits"], device=self.device)
        self.rows.append(_row(FREE, "logits", v))
        self._summarize_logits(truth)

    def _summarize_logits(self, reference: torch.Tensor) -> None:
        ours = self.ours["logits"]
        self.argmax_agreement = metrics.argmax_agreement(ours.to(reference.device), reference)
        self.mean_kl = metrics.kl_next_token(reference, ours, "mean", self.device)


def first_divergence(rows: list[PointResult], num_layers: int) -> PointResult | None:
    """The earliest failing point: teacher-forced rows in trace order first, then free-running."""
    order = {name: k for k, name in enumerate(ordered_names(num_layers))}
    failed = [r for r in rows if not r.passed]
    failed.sort(key=lambda r: (r.mode != TEACHER, order.get(r.name, len(order))))
    return failed[0] if failed else None


def clamp_active_share(model: Transformer, trace: Trace, layer_params: LayerParams | None = None) -> float:
    """Share of the chosen experts' SwiGLU elements on which a clamp acts (gate > limit or
    |up| > limit), measured on the trace's normed MLP inputs."""
    limit = model.spec.swiglu_limit
    layer_params = layer_params or model_layer_params(model)
    active = total = 0
    for i in range(model.spec.num_layers):
        params = layer_params(i)
        gate_up, bias = params["mlp.experts.gate_up_proj"], params["mlp.experts.gate_up_proj_bias"]
        h = trace[layer_name(i, "mlp_norm")].reshape(-1, model.spec.hidden_size).to(gate_up.device)
        idx = trace[layer_name(i, "topk_idx")].reshape(h.shape[0], -1).to(gate_up.device)
        for e in torch.unique(idx).tolist():
            tok = torch.where(idx == e)[0]
            gu = h[tok].double() @ gate_up[e].double() + bias[e].double()
            gate, up = gu[..., 0::2], gu[..., 1::2]
            active += int((gate > limit).sum() + (up.abs() > limit).sum())
            total += gu.numel()
    return active / max(total, 1)


def router_tie_count(trace: Trace, num_layers: int, k: int, dtype: torch.dtype) -> int:
    return sum(metrics.router_ties(trace[layer_name(i, "router_logits")], k, dtype) for i in range(num_layers))

