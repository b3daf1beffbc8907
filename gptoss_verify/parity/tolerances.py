"""The one table of thresholds: per dtype and per comparison kind, each with its reason.

Kinds:
- `oracle`: ours against transformers directly (float64 only: the same math, other summation order).
- `truth`: the truth rule for low precisions. Ours and the oracle are both measured against our
  float64 reference fed the same inputs; ours passes when err_ours ≤ factor·err_oracle + floor·scale
  (flash-attention's rule). Errors are max|Δ| / max|truth|.
- `rounding`: points computed in float32 and rounded once to a narrower dtype (the RMSNorms on
  their teacher-forced input): share of elements not correctly rounded.
- `routing`: share of tokens whose chosen expert set matches the oracle's (ties are reported).
- `free-logits`: free-running end to end, on the next-token distributions: the median over
  positions of KL(truth‖ours) ≤ factor·(the oracle's) + floor. (In a low precision the free-running per-point errors are
  reported as `drift`, not judged: bf16 routing flips between two correct implementations make
  pointwise errors of either side arbitrarily large at the flipped tokens.)
- `gradient`: each parameter's gradient, ours against the oracle's, relative L2.
- `sharded`: the sharded forward against the unsharded model, relative max error.
- `golden`, `golden-kl`: a rerun against the stored golden logits (`golden.py`): max error relative
  to the logits' scale, or for ours in bf16 (not bitwise the oracle) the median KL.
"""
from __future__ import annotations

import dataclasses

import torch

from ..dtypes import dtype_name


@dataclasses.dataclass(frozen=True)
class Tolerance:
    limit: float = 0.0        # bound on the measure (or the floor, for the truth rule)
    factor: float = 0.0       # truth rule: allowed multiple of the oracle's own error
    reason: str = ""


_F64, _F32, _BF16, _F16 = "float64", "float32", "bfloat16", "float16"

TABLE: dict[tuple[str, str], Tolerance] = {
    (_F64, "oracle"): Tolerance(1e-12, reason="the same math in float64; only summation order differs"),
    (_F64, "routing"): Tolerance(1.0, reason="float64 logits never tie on random weights: choices must be equal"),
    (_F64, "gradient"): Tolerance(1e-10, reason="float64 backward: summation order only, a few more steps than forward"),
    (_F64, "sharded"): Tolerance(1e-12, reason="the same math split over ranks; all-reduce order only"),
    (_F32, "truth"): Tolerance(2.0 ** -20, factor=2.0, reason="flash-attention's rule; floor of 8 float32 ulps of the scale"),
    (_BF16, "truth"): Tolerance(2.0 ** -8, factor=2.0, reason="flash-attention's rule; floor of one bf16 ulp of the scale"),
    (_F16, "truth"): Tolerance(2.0 ** -10, factor=2.0, reason="flash-attention's rule; floor of one fp16 ulp of the scale"),
    (_BF16, "rounding"): Tolerance(1e-3, reason="RMSNorm is computed in float32 and rounded once to bf16"),
    (_F16, "rounding"): Tolerance(1e-3, reason="RMSNorm is computed in float32 and rounded once to fp16"),
    (_F32, "routing"): Tolerance(0.97, reason="same inputs give the same logits up to rounding; near-ties may flip"),
    (_BF16, "routing"): Tolerance(0.9, reason="bf16 logits tie often; ties are implementation-defined"),
    (_F16, "routing"): Tolerance(0.9, reason="fp16 logits tie often; ties are implementation-defined"),
    (_F32, "free-logits"): Tolerance(1e-9, factor=2.0, reason="KL grows with depth; truth rule on distributions"),
    (_BF16, "free-logits"): Tolerance(1e-4, factor=2.0, reason="KL grows with depth; truth rule on distributions"),
    (_F16, "free-logits"): Tolerance(1e-5, factor=2.0, reason="KL grows with depth; truth rule on distributions"),
    (_F32, "gradient"): Tolerance(1e-4, reason="float32 backward through softmax and clamp: a few hundred ulps"),
    (_F32, "sharded"): Tolerance(1e-5, reason="float32 matmuls split over ranks reassociate sums"),
    (_BF16, "sharded"): Tolerance(2e-2, reason="bf16 partial sums rounded per rank before the all-reduce"),
    (_F32, "golden"): Tolerance(1e-5, reason="stored float32 logits vs a rerun: summation order or platform moves ~1e-7"),
    (_BF16, "golden"): Tolerance(2.0 ** -5, reason="the oracle's stored bf16 logits vs a rerun: a few bf16 ulps of the scale"),
    (_BF16, "golden-kl"): Tolerance(5e-3, reason="ours vs the oracle's bf16 goldens: two bf16 paths differ (measured 1.5e-4 to 5.4e-4)"),
}


def tolerance(dtype: torch.dtype | str, kind: str) -> Tolerance:
    key = (dtype if isinstance(dtype, str) else dtype_name(dtype), kind)
    try:
        return TABLE[key]
    except KeyError:
        raise KeyError(f"no tolerance for {key[1]!r} comparisons in {key[0]}") from None


def as_markdown_rows() -> list[tuple[str, str, str, str, str]]:
    return [(d, k, f"{t.limit:.3g}", f"{t.factor:g}" if t.factor else "", t.reason) for (d, k), t in TABLE.items()]
