"""The mixture of experts (docs/numerics.md §1, docs/numerics.md §5, docs/numerics.md §6): biased router, top-k then softmax over the k,
clamped SwiGLU on interleaved gate/up, down projection with its bias inside the weighted sum.

Expert weights are in the HF dequantized layout: gate_up [E, H, 2I] and down [E, I, H], used as
`x @ W`. `moe()` is the signature the fused kernel replaces.
"""
from __future__ import annotations

import torch

from .norm import compute_dtype


def route(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [T, E], the top-k expert indices [T, k] (largest first) and their weights."""
    logits = torch.nn.functional.linear(h, weight, bias)
    values, idx = torch.topk(logits, k, dim=-1, sorted=True)
    weights = values.softmax(dim=-1, dtype=compute_dtype(h.dtype))
    return logits, idx, weights.to(h.dtype)


def swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Even columns are the gate (clamped from above only), odd columns are up (clamped both ways,
    then +1): gate·σ(α·gate)·(up + 1)."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def experts(h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
            gate_up_bias: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor, *,
            alpha: float, limit: float) -> torch.Tensor:
    """Σ_k w_k · (swiglu(h @ gate_up[e_k] + b) @ down[e_k] + down_bias[e_k]), looping over the
    experts that were chosen; the sum is accumulated in float32 (float64) and cast once. Expert
    weights are cast to h's dtype one expert at a time (a no-op normally; it lets the float64
    truth run on narrow expert weights without a float64 copy of them all)."""
    out = torch.zeros(h.shape, dtype=compute_dtype(h.dtype), device=h.device)
    for e in torch.unique(idx).tolist():
        token, slot = torch.where(idx == e)
        act = swiglu(h[token] @ gate_up[e].to(h.dtype) + gate_up_bias[e].to(h.dtype), alpha, limit)
        y = act @ down[e].to(h.dtype) + down_bias[e].to(h.dtype)
        out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out.to(h.dtype)


def moe(h: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, gate_up: torch.Tensor,
        gate_up_bias: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor, *, k: int,
        alpha: float, limit: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [T, H] -> (output [T, H], router logits [T, E], top-k indices [T, k], top-k weights [T, k])."""
    logits, idx, weights = route(h, router_weight, router_bias, k)
    out = experts(h, idx, weights, gate_up, gate_up_bias, down, down_bias, alpha=alpha, limit=limit)
    return out, logits, idx, weights


def count_router_ties(logits: torch.Tensor, k: int, *, rel_gap: float = 2.0 ** -8) -> int:
    """How many rows of router logits [T, E] have their k-th and (k+1)-th largest logits within
    `rel_gap` of the larger magnitude of the two (default: one bf16 ulp). On such rows the top-k
    set is implementation-defined (docs/numerics.md §5): parity reports them instead of failing on them.
    With k == E there is no boundary, so no ties."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"count_router_ties: k: expected 1 <= k <= E = {logits.shape[-1]}, got {k}")
    if k == logits.shape[-1]:
        return 0
    top = torch.topk(logits.reshape(-1, logits.shape[-1]).double(), k + 1, dim=-1).values
    inside, outside = top[:, k - 1], top[:, k]
    scale = torch.maximum(inside.abs(), outside.abs())
    return int((inside - outside <= rel_gap * scale).sum())
