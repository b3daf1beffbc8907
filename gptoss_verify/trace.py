"""`Trace`: the named intermediates that our model, the oracle, the sharded forward and the goldens
record, under one naming scheme.

Names are `embed`, `layers.{i}.{point}` for each point of `LAYER_POINTS` in the order they are
computed, then `final_norm` and `logits`. q/k/v are `[batch, seq, heads, head_dim]` (after RoPE for
q and k); every other point keeps its natural shape. Order matters: the first divergence is the
first name, in this order, that fails.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

LAYER_POINTS = (
    "input",          # the residual stream entering the layer (teacher forcing feeds this)
    "attn_norm",      # after input_layernorm
    "q", "k", "v",    # projections; q and k after RoPE
    "attn_core",      # softmax(qk, sink) @ v, heads flattened, before o_proj
    "attn_out",       # after o_proj (+ bias)
    "resid_attn",     # x + attention
    "mlp_norm",       # after post_attention_layernorm
    "router_logits",  # h @ Wr + br
    "topk_idx",       # the chosen experts, sorted by logit (descending)
    "topk_weights",   # softmax over the chosen logits
    "mlp_out",        # Σ_k w_k · expert_k(h)
    "resid_mlp",      # the layer's output
)


def layer_name(layer: int, point: str) -> str:
    return f"layers.{layer}.{point}"


def ordered_names(num_layers: int) -> list[str]:
    names = ["embed"]
    for i in range(num_layers):
        names += [layer_name(i, p) for p in LAYER_POINTS]
    return names + ["final_norm", "logits"]


def split_name(name: str) -> tuple[int | None, str]:
    """`layers.3.q` -> (3, "q"); `logits` -> (None, "logits")."""
    if name.startswith("layers."):
        _, layer, point = name.split(".", 2)
        return int(layer), point
    return None, name


class Trace:
    """An ordered record of named tensors, detached, kept on `device` (default: where they were
    made, which keeps full-width comparisons on the GPU free of host copies)."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.device = device

    def record(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self.tensors[name] = tensor if self.device is None else tensor.to(self.device)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def names(self) -> list[str]:
        return list(self.tensors)


def record(trace: Trace | None, name: str, tensor: torch.Tensor) -> None:
    """Record into an optional trace; a no-op when tracing is off."""
    if trace is not None:
        trace.record(name, tensor)
