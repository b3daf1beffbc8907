"""The one judge: a comparison kind, a dtype and what was measured in, a `Verdict` out.

Every pass/fail decision on numbers (parity teacher-forced and free-running, the sharded forward,
gradients, goldens, the kernel tests, the property laws) goes through `verdict`, which applies the
rule of the kind (`tolerances.KINDS`) with the numbers of its row (`tolerances.TABLE`). `check`
first takes the kind's measure of tensors, then judges. A third-party subject is judged the same
way as ours: `check(kind, dtype, subject, truth, reference=our_plain_reference)` is the truth rule
point by point, and `tokens=metrics.same_expert_set(subject_idx, reference_idx)` leaves out (and
counts, in `Verdict.excluded`) the tokens a routing near-tie sent to other experts.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from . import metrics
from .dtypes import dtype_name
from .tolerances import AT_LEAST, AT_MOST, TRUTH, kind as kind_of, tolerance


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One judged comparison: what a report or a matrix cell prints."""
    kind: str
    dtype: str
    rule: str              # at most | at least | truth
    measure: str           # the measure's name, e.g. "rel max"
    passed: bool
    error: float           # the subject's measure (an agreement share for `at least`)
    bound: float           # what it was held to (truth rule: factor·reference + limit)
    limit: float           # the row's limit (the floor, for the truth rule)
    factor: float          # the row's factor (truth rule), else 0
    reference: float = math.nan   # the plain reference's measure against the truth, where one was given
    excluded: int = 0      # tokens left out of the comparison (`tokens`) or, for routing, those that differ
    reason: str = ""       # the tolerance row's reason

    def __str__(self) -> str:
        op = "≥" if self.rule == AT_LEAST else "≤"
        if not self.passed:
            op = "<" if self.rule == AT_LEAST else ">"
        how = (f"{_g(self.error)} {op} {_g(self.bound)}" if self.rule != TRUTH else
               f"{_g(self.error)} {op} {self.factor:g} × {_g(self.reference)} + {_g(self.limit)} = {_g(self.bound)}")
        left = f", {self.excluded} token(s) left out" if self.excluded else ""
        return (f"{'PASS' if self.passed else 'FAIL'} {self.kind} ({self.dtype}, {self.rule}, {self.measure}): "
                f"{how}{left}; {self.reason}")


def _g(x: float) -> str:
    return f"{x:.3g}"


def verdict(kind: str, dtype: torch.dtype | str, error: float, reference: float = math.nan,
            excluded: int = 0) -> Verdict:
    """Apply the kind's rule to measured numbers. NaN always fails."""
    k, tol = kind_of(kind), tolerance(dtype, kind)
    if k.rule == TRUTH:
        bound = tol.factor * reference + tol.limit
        passed = error <= bound  # False when either is NaN
    elif k.rule == AT_MOST:
        bound, passed = tol.limit, error <= tol.limit
    elif k.rule == AT_LEAST:
        bound, passed = tol.limit, error >= tol.limit
    else:
        raise ValueError(f"{kind}: unknown rule {k.rule!r}")
    return Verdict(kind, dtype_name(dtype), k.rule, k.measure, bool(passed), float(error), float(bound),
                   tol.limit, tol.factor, float(reference), excluded, tol.reason)


def _rel_max(a, ref, dtype, device, scale):
    return metrics.summarize(a, ref, dtype, device).rel_max_abs


def _rel_max_unit(a, ref, dtype, device, scale):
    """max|a − ref| / max(1, scale or max|ref|): relative for large values, absolute below 1."""
    if ref.numel() == 0:
        return 0.0
    s = metrics.summarize(a, ref, dtype, device)
    return s.max_abs / max(1.0, s.scale if scale is None else scale)


def _rel_l2(a, ref, dtype, device, scale):
    return metrics.summarize(a, ref, dtype, device).rel_l2


def _median_kl(a, ref, dtype, device, scale):
    return metrics.kl_next_token(ref, a, "median", device)


def _not_rounded(a, ref, dtype, device, scale):
    return metrics.not_correctly_rounded_share(a, ref, dtype)


def _set_agreement(a, ref, dtype, device, scale):
    return metrics.set_agreement(a, ref)


# name -> measure(subject, truth, dtype, device, scale) -> float; the names are those of `tolerances.KINDS`
MEASURES: dict[str, Callable[..., float]] = {
    "rel max": _rel_max,
    "rel max (scale ≥ 1)": _rel_max_unit,
    "rel L2": _rel_l2,
    "median KL": _median_kl,
    "not correctly rounded": _not_rounded,
    "expert set agreement": _set_agreement,
}


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def measure(kind: str, dtype: torch.dtype | str, subject: torch.Tensor, truth: torch.Tensor) -> float:
    """The kind's measure of `subject` against `truth` alone: for `verdict` on numbers measured
    against different truths (a subject's decode against its own prefill, ours against ours)."""
    return MEASURES[kind_of(kind).measure](subject, truth, _dtype(dtype), None, None)


def check(kind: str, dtype: torch.dtype | str, subject: torch.Tensor, truth: torch.Tensor,
          reference: torch.Tensor | None = None, *, tokens: torch.Tensor | None = None,
          scale: float | None = None, device: str | torch.device | None = None) -> Verdict:
    """Measure `subject` (and `reference`, if given) against `truth` by the kind's measure, then
    judge. `tokens` (bool over the leading dims) keeps only those tokens; `scale` replaces max|truth|
    for the `scale ≥ 1` measure; the arithmetic runs on `device` (default: the truth's)."""
    k = kind_of(kind)
    if k.rule == TRUTH and reference is None:
        raise ValueError(f"{kind}: the truth rule needs the plain reference's output in {dtype_name(dtype)}")
    measure = MEASURES[k.measure]
    excluded = 0
    if tokens is not None:
        excluded = int((~tokens).sum())
        subject, truth = subject[tokens], truth[tokens.to(truth.device)]
        reference = None if reference is None else reference[tokens.to(reference.device)]
    if k.measure == "expert set agreement":  # the tokens routed elsewhere are counted
        excluded += int((~metrics.same_expert_set(subject, truth)).sum())
    wide = _dtype(dtype)
    err = measure(subject, truth, wide, device, scale)
    ref_err = math.nan if reference is None else measure(reference, truth, wide, device, scale)
    return verdict(kind, dtype, err, ref_err, excluded)
