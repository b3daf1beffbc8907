"""Attention with sinks, sliding windows and GQA (docs/numerics.md §1, docs/numerics.md §2, docs/numerics.md §3), plus a windowed KV cache.

The reference `attention()` is the signature the fused kernel replaces: queries at absolute
positions `q_start + i`, keys at `k_start + j`; key j is visible from query i iff
`q_pos − W < k_pos ≤ q_pos` (W keys including the query's own) on sliding layers, `k_pos ≤ q_pos`
on full ones. The sink is one extra logit per query head: unscaled, no value row, inside the max.
"""
from __future__ import annotations

import dataclasses

import torch

from .norm import compute_dtype


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [Sq, Sk]: may query at q_pos[i] see key at k_pos[j]?"""
    qi, kj = q_pos[:, None], k_pos[None, :]
    mask = kj <= qi
    if window is not None:
        mask &= kj > qi - window
    return mask


_SCORE_BUDGET = 1 << 27  # score elements materialised at once (1 GiB in float64)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, *,
              window: int | None, q_start: int = 0, k_start: int = 0) -> torch.Tensor:
    """softmax([q·kᵀ/√D + mask, sink]) without the sink column, times v.

    q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D]; sinks [Hq]. Returns [B, Sq, Hq, D] in q's dtype.
    Scores are formed in the input dtype; the softmax runs in float32 (float64 for float64 input).
    """
    b, sq, hq, d = q.shape
    rows = max(1, _SCORE_BUDGET // (b * hq * k.shape[1]))
    if sq > rows:  # long sequences: the same computation over query chunks, bounding memory
        return torch.cat([attention(q[:, i:i + rows], k, v, sinks, window=window, q_start=q_start + i,
                                    k_start=k_start) for i in range(0, sq, rows)], dim=1)
    hkv = k.shape[2]
    group = hq // hkv
    qg = q.view(b, sq, hkv, group, d)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k) * d ** -0.5
    q_pos = torch.arange(sq, device=q.device) + q_start
    k_pos = torch.arange(k.shape[1], device=q.device) + k_start
    mask = visible(q_pos, k_pos, window)
    sink = sinks.view(hkv, group, 1, 1).to(scores.dtype)
    wide = compute_dtype(q.dtype)
    logits = scores.to(wide).masked_fill(~mask, float("-inf"))
    sink_col = sink.to(wide).expand(b, hkv, group, sq, 1)
    probs = torch.cat([logits, sink_col], dim=-1).softmax(dim=-1)[..., :-1]
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs.to(v.dtype), v)
    return out.reshape(b, sq, hq, d)


@dataclasses.dataclass
class LayerCache:
    """Keys and values seen so far by one layer; sliding layers keep only the last W − 1 keys
    (with the next query's own key that makes the W it may see)."""
    window: int | None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    start: int = 0  # absolute position of k[:, 0]

    def extend(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append the new keys at absolute position `pos`; return all keys to attend over and the
        absolute position of the first one, then trim what no later query can see."""
        if self.k is None:
            self.start = pos
            keys, values = k, v
        else:
            if self.start + self.k.shape[1] != pos:
                raise ValueError(f"KV cache holds positions up to {self.start + self.k.shape[1]}, "
                                 f"got new tokens at {pos}")
            keys, values = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
        start = self.start
        keep = keys.shape[1] if self.window is None else min(keys.shape[1], self.window - 1)
        self.k, self.v = keys[:, keys.shape[1] - keep:], values[:, values.shape[1] - keep:]
        self.start = start + keys.shape[1] - keep
        return keys, values, start

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

