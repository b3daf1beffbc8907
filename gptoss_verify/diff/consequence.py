"""What a difference does: both checkpoints through our model on the same tokens, one layer at a time.

The comparison hands every canonical pair over as it streams; when a layer's tensors are all
there on both sides, each side's residual stream goes through that layer (our `DecoderLayer`,
reference blocks, float32 activations, each side with its own config), the two traces are
compared point by point, and the layer's weights are dropped. So only one layer per side is
ever held, whatever the model's size. The embedding contributes only the rows of the tokens.
At the end: KL(A ‖ B) of the next-token distributions, argmax agreement, and the first trace
point where the two runs part (the first whose values are not identical). While the tensors of
a layer are identical on both sides and the inputs are too, the layer runs once.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .deps import (LAYER_POINTS, LAYER_TENSORS, DecoderLayer, ModelSpec, Trace, block_functions, canonical_table,
                   cos_sin, is_expert_weight, layer_name, rms_norm)
from .sources import same_spec
from .tensors import Held

_LOGIT_ROWS = 16384  # lm_head rows cast to float32 at a time
_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "num_experts")


@dataclasses.dataclass
class PointGap:
    name: str  # trace point, e.g. "layers.2.mlp_out"
    max_abs: float
    rel: float  # max|A − B| / max|A|


@dataclasses.dataclass
class LayerGap:
    layer: int
    rel: float  # of the layer's output residual stream
    routing: float  # share of tokens whose chosen expert sets agree


@dataclasses.dataclass
class ConsequenceResult:
    ran: bool
    reason: str  # why not run, or where it stopped
    tokens: int
    layers_run: int
    first_part: PointGap | None
    layers: list[LayerGap]
    kl_mean: float | None = None
    kl_max: float | None = None
    argmax_agreement: float | None = None
    vocab_compared: int | None = None


class Consequence:
    def __init__(self, spec_a: ModelSpec, spec_b: ModelSpec, tokens: int = 32, seed: int = 0,
                 max_layers: int | None = None) -> None:
        self.specs = {"A": spec_a, "B": spec_b}
        self.tokens = tokens
        self.max_layers = spec_a.num_layers if max_layers is None else min(max_layers, spec_a.num_layers)
        shape_diff = [f for f in _SHAPE_FIELDS if getattr(spec_a, f) != getattr(spec_b, f)]
        self.stopped = (f"not run: the configs differ in shape ({', '.join(shape_diff)})" if shape_diff else "")
        vocab = min(spec_a.vocab_size, spec_b.vocab_size)
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (1, tokens), generator=gen)
        self.vocab = vocab
        self.shapes = {s: {n: shape for n, (shape, _) in canonical_table(spec).items()}
                       for s, spec in self.specs.items()}
        self.held: dict[str, dict[str, torch.Tensor]] = {"A": {}, "B": {}}
        self.same: dict[str, bool] = {}
        self.x: dict[str, torch.Tensor | None] = {"A": None, "B": None}
        self.identical = True  # the two residual streams are the same tensor so far
        self.next_layer = 0
        self.first_part: PointGap | None = None
        self.layers: list[LayerGap] = []
        self.result: ConsequenceResult | None = None

    # ---- input ----------------------------------------------------------------------------------
    def feed(self, name: str, a: Held, b: Held, identical: bool) -> None:
        if self.stopped or self.result is not None:
            return
        layer = _layer_of(name)
        if layer is not None and layer >= self.max_layers:
            return
        if name not in self.shapes["A"]:
            return  # not a canonical tensor (an extra): the pairing reports it
        for side, held in (("A", a), ("B", b)):
            expected = self.shapes[side].get(name)
            if expected is None or tuple(held.shape) != tuple(expected) or not (held.mx or held.tensor.is_floating_point()):
                self.stopped = (f"stopped before layer {self.next_layer}: {side}'s {name} is {held.describe()}, "
                                f"its config implies {list(expected) if expected else 'no such tensor'}")
                self._drop()
                return
        self.held["A"][name] = a.dense(torch.bfloat16) if a.mx else a.tensor
        self.held["B"][name] = b.dense(torch.bfloat16) if b.mx else b.tensor
        self.same[name] = identical
        self._advance()

    def _drop(self) -> None:
        self.held = {"A": {}, "B": {}}

    def _advance(self) -> None:
        held = self.held
        if self.x["A"] is None and "model.embed_tokens.weight" in held["A"]:
            for side in ("A", "B"):
                self.x[side] = held[side].pop("model.embed_tokens.weight")[self.ids].float()
            self.identical = self.same.pop("model.embed_tokens.weight") and same_spec(*self.specs.values())
            if not self.identical:
                self._part("embed", self.x["A"], self.x["B"])
        while self.x["A"] is not None and self.next_layer < self.max_layers:
            prefix = f"model.layers.{self.next_layer}."
            names = [prefix + t for t in LAYER_TENSORS]
            if not all(n in held["A"] for n in names):
                return
            self._run_layer(self.next_layer, {s: {n[len(prefix):]: held[s].pop(n) for n in names} for s in held},
                            all(self.same.pop(n) for n in names))
            self.next_layer += 1
        if (self.x["A"] is not None and self.next_layer == self.max_layers and self.max_layers < self.specs["A"].num_layers):
            self._finish_early()
        elif self.next_layer == self.specs["A"].num_layers and all(
                n in held["A"] for n in ("model.norm.weight", "lm_head.weight")):
            self._head({s: (held[s].pop("model.norm.weight"), held[s].pop("lm_head.weight")) for s in held})

    # ---- the forward ----------------------------------------------------------------------------
    def _run_layer(self, i: int, weights: dict[str, dict[str, torch.Tensor]], same_weights: bool) -> None:
        traces = {}
        share = self.identical and same_weights
        for side in ("A",) if share else ("A", "B"):
            spec = self.specs[side]
            with torch.device("meta"):
                layer = DecoderLayer(spec, i)
            # expert weights stay in their dtype (the reference casts one expert at a time)
            state = {n: t if is_expert_weight(n) else t.float() for n, t in weights[side].items()}
            layer.load_state_dict(state, strict=True, assign=True)
            cos, sin = cos_sin(spec, torch.arange(self.tokens), torch.float32)
            trace = Trace()
            with torch.no_grad():
                self.x[side] = layer(self.x[side], cos, sin, 0, None, block_functions("reference"), trace)
            traces[side] = trace
            del layer, state
        if share:
            self.x["B"] = self.x["A"]
            self.layers.append(LayerGap(i, 0.0, 1.0))
            return
        self.identical = False
        for point in LAYER_POINTS:
            name = layer_name(i, point)
            self._part(name, traces["A"][name], traces["B"][name])
        ia, ib = traces["A"][layer_name(i, "topk_idx")], traces["B"][layer_name(i, "topk_idx")]
        routing = float((ia.sort(-1).values == ib.sort(-1).values).all(-1).double().mean())
        self.layers.append(LayerGap(i, _rel(self.x["A"], self.x["B"]), routing))

    def _part(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.first_part is None and (a.shape != b.shape or not torch.equal(a, b)):
            if a.shape != b.shape:
                self.first_part = PointGap(name, math.inf, math.inf)
            else:
                diff = (a.double() - b.double()).abs()
                self.first_part = PointGap(name, float(diff.max()), _rel(a, b))

    def _head(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        logits = {}
        for side, (norm, head) in weights.items():
            if side == "B" and self.identical and torch.equal(norm, weights["A"][0]) and torch.equal(head[:self.vocab], weights["A"][1][:self.vocab]):
                logits["B"] = logits["A"]
                continue
            h = rms_norm(self.x[side], norm.float(), self.specs[side].rms_norm_eps)
            head = head[:self.vocab]
            logits[side] = torch.cat([h @ head[r:r + _LOGIT_ROWS].float().T for r in range(0, self.vocab, _LOGIT_ROWS)], -1)
        self._part("final_norm", *(rms_norm(self.x[s], weights[s][0].float(), self.specs[s].rms_norm_eps)
                                   for s in ("A", "B")))
        self._part("logits", logits["A"], logits["B"])
        la, lb = logits["A"].double().reshape(-1, self.vocab), logits["B"].double().reshape(-1, self.vocab)
        pa, pb = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
        kl = (pa.exp() * (pa - pb)).sum(-1)
        self.result = ConsequenceResult(True, "", self.tokens, self.next_layer, self.first_part, self.layers,
                                        float(kl.mean()), float(kl.max()),
                                        float((la.argmax(-1) == lb.argmax(-1)).double().mean()), self.vocab)
        self._drop()

    def _finish_early(self) -> None:
        self.result = ConsequenceResult(True, f"the first {self.max_layers} layers only (no logits)", self.tokens,
                                        self.next_layer, self.first_part, self.layers)
        self._drop()

    def finish(self) -> ConsequenceResult:
        if self.result is None:
            reason = self.stopped or (f"stopped before layer {self.next_layer}: tensors missing on a side"
                                      if self.next_layer < self.max_layers else "stopped before the head: "
                                      "model.norm.weight or lm_head.weight missing on a side")
            self.result = ConsequenceResult(False if self.next_layer == 0 else True, reason, self.tokens,
                                            self.next_layer, self.first_part, self.layers)
            self._drop()
        return self.result


def _layer_of(name: str) -> int | None:
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = float(a.abs().max()) if a.numel() else 0.0
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    return diff / scale if scale else (0.0 if diff == 0 else math.inf)
