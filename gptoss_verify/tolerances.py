"""The one table of thresholds: per dtype and comparison kind, each row with its reason.

A kind says what is compared, by which measure and which rule (`KINDS`); a row of `TABLE` gives
its numbers in one dtype (`ANY` where the numbers do not depend on the dtype). `judge.py` applies
them; nothing else holds a threshold. The rules:

- `at most`: the measure ≤ limit (float64 against float64, a rerun against a stored result, a law).
- `at least`: the measure ≥ limit (routing agreement).
- `truth`: the truth rule for low precisions (flash-attention's rule). The subject and a plain
  reference in the same dtype are both measured against a float64 truth fed the same inputs; the
  subject passes when err_subject ≤ factor·err_reference + limit (the floor).

In a low precision the free-running per-point errors of parity are reported as drift, not judged:
bf16 routing flips between two correct implementations make pointwise errors of either side
arbitrarily large at the flipped tokens; the verdict is `free-logits`, on the distributions.
"""
from __future__ import annotations

import dataclasses

import torch

from .dtypes import dtype_name

AT_MOST, AT_LEAST, TRUTH = "at most", "at least", "truth"
ANY = "any"  # a row that holds in every dtype


@dataclasses.dataclass(frozen=True)
class Kind:
    rule: str       # AT_MOST | AT_LEAST | TRUTH
    measure: str    # a measure of `judge.MEASURES`
    what: str       # what is compared, in one line


KINDS: dict[str, Kind] = {
    "oracle": Kind(AT_MOST, "rel max", "parity: ours against transformers directly (float64)"),
    "truth": Kind(TRUTH, "rel max", "parity: ours and transformers against our float64 reference"),
    "rounding": Kind(AT_MOST, "not correctly rounded", "parity: RMSNorm outputs on the teacher-forced input"),
    "routing": Kind(AT_LEAST, "expert set agreement", "parity and sharded forward: chosen expert sets"),
    "free-logits": Kind(TRUTH, "median KL", "parity free-running: next-token distributions against the truth"),
    "gradient": Kind(AT_MOST, "rel L2", "each parameter's gradient, ours against the oracle's"),
    "sharded": Kind(AT_MOST, "rel max", "the sharded forward against the unsharded model"),
    "golden": Kind(AT_MOST, "rel max", "a rerun against the stored golden logits"),
    "golden-kl": Kind(AT_MOST, "median KL", "ours in bf16 against the oracle's stored golden logits"),
    "attention-kernel": Kind(TRUTH, "rel max (scale ≥ 1)", "fused attention (out, dq, dk, dv, dsink) vs the reference path"),
    "moe-kernel": Kind(TRUTH, "rel L2", "fused MoE (out, router logits, weights) vs the reference path"),
    "moe-kernel-grad": Kind(TRUTH, "rel L2", "fused MoE backward: each input's gradient vs the reference path's autograd"),
    "moe-kernel-routing": Kind(AT_LEAST, "expert set agreement", "fused MoE: tokens whose set agrees with the truth's on both paths"),
    "probe": Kind(TRUTH, "rel max", "a feature probe: a subject's logits on the probe's crafted case against the truth"),
    "law": Kind(AT_MOST, "rel max (scale ≥ 1)", "a property law: both sides of an identity"),
    "router-float32": Kind(AT_MOST, "rel max", "a subject whose router softmax is float32 in any dtype "
                           "(megatron-core): its float64 points from the first routing on, against the truth"),
}


@dataclasses.dataclass(frozen=True)
class Tolerance:
    limit: float = 0.0        # bound on the measure (the floor, for the truth rule)
    factor: float = 0.0       # truth rule: allowed multiple of the plain reference's own error
    reason: str = ""


_F64, _F32, _BF16, _F16 = "float64", "float32", "bfloat16", "float16"

TABLE: dict[tuple[str, str], Tolerance] = {
    # parity, sharded forward, gradients, goldens
    (_F64, "oracle"): Tolerance(1e-12, reason="the same math in float64; only summation order differs"),
    (_F64, "routing"): Tolerance(1.0, reason="float64 logits never tie on random weights: choices must be equal"),
    (_F64, "gradient"): Tolerance(1e-10, reason="float64 backward: summation order only, a few more steps than forward"),
    (_F64, "sharded"): Tolerance(1e-12, reason="the same math split over ranks; all-reduce order only"),
    (_F64, "router-float32"): Tolerance(1e-5, reason="routing weights rounded to float32 (~6e-8 relative each), carried through the expert sum and later layers; measured ≤ 1e-7"),
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
    # kernels (tests/kernels)
    (_F32, "attention-kernel"): Tolerance(1e-5, factor=2.0, reason="2x rule; floor of ~80 float32 ulps of max(1, scale): blockwise online softmax reorders sums"),
    (_F16, "attention-kernel"): Tolerance(2e-3, factor=2.0, reason="2x rule; floor of about two fp16 ulps (2^-9) of max(1, scale)"),
    (_BF16, "attention-kernel"): Tolerance(1e-2, factor=2.0, reason="2x rule; floor of about one bf16 ulp (2^-7) of max(1, scale)"),
    (ANY, "moe-kernel"): Tolerance(1e-5, factor=2.0, reason="2x rule on relative L2; floor for float32 summation-order noise"),
    (ANY, "moe-kernel-grad"): Tolerance(1e-5, factor=2.0, reason="2x rule on relative L2, as the forward; floor for float32 summation-order noise"),
    (ANY, "moe-kernel-routing"): Tolerance(0.9, reason="near-tied router logits may be chosen differently; a large majority must agree"),
    # feature probes (subjects/probes.py): logits of crafted tiny cases
    (_F64, "probe"): Tolerance(1e-12, factor=2.0, reason="float64 against the float64 truth: summation order only"),
    (_F32, "probe"): Tolerance(2.0 ** -20, factor=2.0, reason="flash-attention's rule on logits; floor of 8 float32 ulps of the scale"),
    (_BF16, "probe"): Tolerance(2.0 ** -8, factor=2.0, reason="flash-attention's rule on logits; floor of one bf16 ulp of the scale"),
    (_F16, "probe"): Tolerance(2.0 ** -10, factor=2.0, reason="flash-attention's rule on logits; floor of one fp16 ulp of the scale"),
    # property laws (tests/properties), relative to max(1, the largest magnitude compared)
    (_F64, "law"): Tolerance(1e-12, reason="float64 laws are exact up to summation order"),
    (_F32, "law"): Tolerance(1e-5, reason="float32: ~80 ulps of summation order through a softmax or matmul"),
    (_F16, "law"): Tolerance(4e-3, reason="fp16: about four ulps (2^-10 each) through a softmax or matmul"),
    (_BF16, "law"): Tolerance(3e-2, reason="bf16: about four ulps (2^-7 each) through a softmax or matmul"),
}


def kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"no comparison kind {name!r}; known: {', '.join(KINDS)}") from None


def tolerance(dtype: torch.dtype | str, kind: str) -> Tolerance:
    name = dtype_name(dtype)
    for key in ((name, kind), (ANY, kind)):
        if key in TABLE:
            return TABLE[key]
    raise KeyError(f"no tolerance for {kind!r} comparisons in {name}")


def as_markdown_rows() -> list[tuple[str, str, str, str, str, str]]:
    """(dtype, kind, rule, limit or floor, factor, reason) for every row, in table order."""
    return [(d, k, f"{KINDS[k].rule}: {KINDS[k].measure}", f"{t.limit:.3g}", f"{t.factor:g}" if t.factor else "",
             t.reason) for (d, k), t in TABLE.items()]
