"""The sharded trace against the unsharded model's, point by point in computation order.

Float points: relative max error max|Δ| / max|reference| within the `sharded` tolerance of
`tolerances.py` (float64: 1e-12), judged by `judge.py` like every comparison. `topk_idx`: the share of tokens whose chosen expert set
matches, against the `routing` tolerance (float64: every token). `logits`: the real vocabulary is
compared; the padding columns Megatron computes must be exactly zero (zero padding rows).
In a low precision the sharded and unsharded runs round differently (partial sums are rounded per
rank before the all-reduce, as in Megatron), and attention or routing can amplify one ulp; so
there a float point also passes by the truth rule (`truth` tolerance): the sharded run is no
further from the float64 unsharded run than `factor` times the unsharded run's own error plus a
floor. The first failing point, in order, names the layer and point where the layout is wrong.
"""
from __future__ import annotations

import dataclasses

import torch

from ..judge import check
from ..tolerances import tolerance
from ..trace import ordered_names


@dataclasses.dataclass
class Row:
    name: str
    measure: float
    limit: float
    ok: bool
    kind: str  # "relative max error" | "routing agreement" | ...
    note: str = ""


def compare(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], num_layers: int, vocab: int,
            dtype: torch.dtype, truth: dict[str, torch.Tensor] | None = None) -> list[Row]:
    """`truth`: the unsharded model's trace in float64 (low precisions only)."""
    rows: list[Row] = []
    sharded = tolerance(dtype, "sharded").limit
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
            v = check("routing", dtype, a, b)
            rows.append(Row(name, v.error, v.bound, v.passed, "routing agreement",
                            f"{v.excluded} token(s) differ" if v.error < 1 else ""))
            continue
        v = check("sharded", dtype, a, b)
        ok = v.passed
        if not ok and truth is not None and name in truth:
            t = truth[name][..., :vocab] if name == "logits" else truth[name]
            rule = check("truth", dtype, a, t, b)
            ok = rule.passed
            note = (f"truth rule: sharded {rule.error:.3g} vs float64, unsharded {rule.reference:.3g}; "
                    f"bound {rule.factor:g}x + {rule.limit:.3g} = {rule.bound:.3g}")
        rows.append(Row(name, v.error, v.bound, ok, "relative max error", note))
    return rows


def first_failure(rows: list[Row]) -> Row | None:
    return next((r for r in rows if not r.ok), None)
