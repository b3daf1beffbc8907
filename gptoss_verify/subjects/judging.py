"""A subject judged against the float64 truth with the one judge (`judge.check`).

The truth is our plain reference in float64 on the case's weights as the subject gets them (rounded
to the case's dtype, then widened), so only the arithmetic is judged, not the weights' rounding.
In float64 a subject is held to the truth directly (kind `oracle`). In a low precision the truth
rule applies: the subject passes a point when its error against the truth is at most the factor ×
our plain reference's error in the same dtype, plus the floor (kind `truth`), point by point where
it exposes points; its logits are always judged on next-token distributions (kind `free-logits`).
Tokens whose chosen expert set differs between subject, reference and truth at a layer (a bf16
near-tie) are left out of every later point and counted (`Verdict.excluded`); the expert choice
itself is judged by the routing kind.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import metrics
from ..judge import Verdict, check
from .ours import Ours
from .protocol import Case, Output, layer_name, point_names, split_name, validate_output


@dataclasses.dataclass
class Cell:
    name: str          # a trace name, or "next-token" for the distributions
    verdict: Verdict


@dataclasses.dataclass
class SubjectVerdict:
    subject: str
    dtype: str
    cells: list[Cell]

    @property
    def passed(self) -> bool:
        return all(c.verdict.passed for c in self.cells)

    @property
    def first_failure(self) -> Cell | None:
        return next((c for c in self.cells if not c.verdict.passed), None)


def truth_and_reference(case: Case) -> tuple[Output, Output | None]:
    """Our float64 truth and our plain reference in the case's dtype (None in float64)."""
    rounded = case.dense_state()
    wide = dataclasses.replace(case, state={n: t.double() if t.is_floating_point() else t for n, t in rounded.items()},
                               checkpoint=None, dtype=torch.float64)
    ours = Ours("reference")
    truth = ours.run(wide)
    ref = None if case.dtype == torch.float64 else ours.run(dataclasses.replace(case, state=rounded, checkpoint=None))
    return truth, ref


def judge_output(output: Output, case: Case, exposed: tuple[str, ...], subject: str = "subject",
                 baseline: tuple[Output, Output | None] | None = None) -> SubjectVerdict:
    """Judge a subject's (validated) output. `exposed` are the point names to judge (those the
    subject states it exposes and handed back); `baseline` reuses `truth_and_reference(case)`."""
    truth, ref = baseline or truth_and_reference(case)
    dtype = case.dtype
    cells: list[Cell] = []
    got = {"logits": output.logits, **output.points}
    mask = torch.ones(case.input_ids.shape, dtype=torch.bool)
    names = [n for n in point_names(case.spec, tuple(exposed)) if n in got and split_name(n)[1] != "input"]
    for name in names:
        point = split_name(name)[1]
        s, t = got[name].cpu(), truth.points.get(name, truth.logits if name == "logits" else None)
        r = None if ref is None else ref.points.get(name, ref.logits if name == "logits" else None)
        if point == "topk_idx":
            cells.append(Cell(name, check("routing", dtype, s, t)))
            same = metrics.same_expert_set(s, t)
            if r is not None:
                same &= metrics.same_expert_set(r, t)
            mask &= same
            continue
        tokens = None if mask.all() else mask
        if ref is None:
            cells.append(Cell(name, check("oracle", dtype, s, t, tokens=tokens)))
        else:
            cells.append(Cell(name, check("truth", dtype, s, t, r, tokens=tokens)))
    if ref is None:
        if "logits" not in names:
            cells.append(Cell("logits", check("oracle", dtype, output.logits.cpu(), truth.logits)))
    else:
        cells.append(Cell("next-token", check("free-logits", dtype, output.logits.cpu(), truth.logits, ref.logits)))
    return SubjectVerdict(subject, case.dtype_name, cells)


def judge_subject(subject, case: Case, baseline=None) -> SubjectVerdict:
    """Run `subject` on `case`, check what it hands back, judge it."""
    output = validate_output(subject.run(case), case, where=f"subject {subject.name}")
    exposed = tuple(p for p in subject.points if p == "logits" or any(split_name(n)[1] == p for n in output.points))
    return judge_output(output, case, exposed, subject.name, baseline)


__all__ = ["Cell", "SubjectVerdict", "judge_output", "judge_subject", "truth_and_reference", "layer_name"]
