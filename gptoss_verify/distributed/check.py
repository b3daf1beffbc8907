"""The sharded trace against the unsharded model's, point by point in computation order.

Float points: relative max error max|Δ| / max|reference| within the `sharded` tolerance of
`parity/tolerances.py` (float64: 1e-12). `topk_idx`: the share of tokens whose chosen expert set
matches, against the `routing` tolerance (float64: every token). `logits`: the real vocabulary is
compared; the padding columns Megatron computes must be exactly zero (zero padding rows).
The first failing point, in order, names the layer and point where the layout is wrong.
"""
from __future__ import annotations

import dataclasses

import torch

from ..parity.tolerances import tolerance
from ..parity.trace import ordered_names


@dataclasses.dataclass
class Row:
    name: str
    measure: float
    limit: float
    ok: bool
    kind: str  # "relative max error" | "routing agreement" | ...
    note: str = ""


def compare(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], num_layers: int, vocab: int,
            dtype: torch.dtype) -> list[Row]:
    rows: list[Row] = []
    sharded = tolerance(dtype, "sharded").limit
    routing = tolerance(dtype, "routing").limit
    for name in ordered_names(num_layers):
        if name not in ref:
            continue
        if name not in ours:
            rows.append(Row(name, float("nan"), sharded, False, "missing", "the sharded run did not produce it"))
            continue
        a, b = ours[name], ref[name]
        note = ""
        if name == "logits":
            pad = a[..., vocab:]
            if pad.numel() and bool((pad != 0).any()):
                rows.append(Row(name, float((pad.double().abs()).max()), 0.0, False, "padding columns",
                                f"logits of the {pad.shape[-1]} vocabulary padding rows are not zero"))
                continue
            a = a[..., :vocab]
        if a.shape != b.shape:
            rows.append(Row(name, float("nan"), sharded, False, "shape", f"{list(a.shape)} vs {list(b.shape)}"))
            continue
        if name.endswith("topk_idx"):
            same = (a.sort(dim=-1).values == b.sort(dim=-1).values).all(dim=-1)
            share = float(same.double().mean())
            rows.append(Row(name, share, routing, share >= routing, "routing agreement",
                            f"{int((~same).sum())} token(s) differ" if share < 1 else ""))
            continue
        diff = float((a.double() - b.double()).abs().max())
        scale = float(b.double().abs().max())
        rel = diff / scale if scale > 0 else diff
        if rel != rel:  # NaN
            rel = float("inf")
        rows.append(Row(name, rel, sharded, rel <= sharded, "relative max error", note))
    return rows


def first_failure(rows: list[Row]) -> Row | None:
    return next((r for r in rows if not r.ok), None)
