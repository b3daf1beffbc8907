"""One subject in one dtype, judged once and read cell by cell: what the pytest plugin's tests ask.

`Battery.cell_names()` is known before anything runs (the points the subject declares, the
next-token distributions, the probes), so each can be a test; the first `outcome(name)` runs the
subject, the judge and the probes, and every later one reads the stored result.
"""
from __future__ import annotations

import dataclasses

from .matrix import ERROR, JUDGED, Row, judge_row, probes_module, to_json, to_markdown
from .protocol import Case, point_names, split_name
from .registry import resolve

PROBE_PREFIX = "probe:"


@dataclasses.dataclass
class Outcome:
    status: str          # "passed" | "failed" | "skipped"
    message: str         # the verdict, or why skipped


def subject_name(option: str) -> str:
    """`mypkg.engine:build` -> `python:mypkg.engine:build`; a built-in name as it is."""
    return f"python:{option}" if ":" in option and not option.startswith(("python:", "hf:")) else option


def probe_names() -> list[str]:
    probes = probes_module()
    if probes is None:
        return []
    table = probes.PROBES
    return [p if isinstance(p, str) else p.name for p in (table.values() if isinstance(table, dict) else table)]


class Battery:
    def __init__(self, name: str, case: Case, with_probes: bool = True, subject=None):
        self.name, self.case, self.with_probes = subject_name(name), case, with_probes
        # imports the user's module now (unless given): a bad name fails collection, not each test
        self.subject = subject if subject is not None else resolve(self.name)
        self._row: Row | None = None

    @staticmethod
    def default_dtypes(subject) -> list[str]:
        return ["bfloat16"] if "bfloat16" in subject.precisions else list(subject.precisions[:1])

    def cell_names(self) -> list[str]:
        points = [n for n in point_names(self.case.spec, tuple(self.subject.points)) if split_name(n)[1] != "input"]
        last = "next-token" if self.case.dtype_name != "float64" else ([] if "logits" in points else "logits")
        probes = [PROBE_PREFIX + p for p in probe_names()] if self.with_probes else []
        return [*points, *([last] if last else []), *probes]

    @property
    def row(self) -> Row:
        if self._row is None:
            self._row = judge_row(self.subject, self.case, with_probes=self.with_probes)
        return self._row

    def report(self) -> str:
        """The subject's matrix report (markdown), attached to each failing test."""
        return to_markdown(to_json([self.row], {"subject": self.name, "case": describe(self.case)}),
                           title=f"gptoss-verify: {self.subject.name} ({self.case.dtype_name})")

    def outcome(self, cell: str) -> Outcome:
        row = self.row
        if row.status == ERROR:
            return Outcome("failed", f"{self.subject.name}: {row.reason}")
        if row.status != JUDGED:
            return Outcome("skipped", f"{self.subject.name} unavailable: {row.reason}")
        if cell.startswith(PROBE_PREFIX):
            found = [p for p in row.probes if p.name == cell[len(PROBE_PREFIX):]]
            if not found:
                return Outcome("skipped", f"probe {cell} was not run for this subject")
            p = found[0]
            if not getattr(p, "applicable", True):
                return Outcome("skipped", f"probe {p.name} (feature: {p.feature}) not applicable: {p.note}")
            if p.error == float("inf"):
                return Outcome("failed", f"FAIL probe {p.name} (feature: {p.feature}): {p.note}")
            return Outcome("passed" if p.passed else "failed",
                           f"{'PASS' if p.passed else 'FAIL'} probe {p.name} (feature: {p.feature}): error "
                           f"{p.error:.3g} {'≤' if p.passed else '>'} bound {p.bound:.3g}")
        if cell in row.verdict.not_judged:
            return Outcome("skipped", f"{cell}: not judged: {row.verdict.not_judged[cell]}")
        found = [c for c in row.verdict.cells if c.name == cell]
        if not found:
            return Outcome("failed", f"{cell}: the subject declares this point but did not hand it back")
        v = found[0].verdict
        return Outcome("passed" if v.passed else "failed", f"{cell}: {v}")


def describe(case: Case) -> str:
    b, s = case.input_ids.shape
    return f"{case.spec.name} ({case.spec.num_layers} layers), batch {b} × seq {s}, offset {case.offset}"
