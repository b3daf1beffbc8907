"""The matrix: subjects as rows, the feature probes and the trace points as columns, each cell
PASS/FAIL with its measured error and bound; markdown, JSON and a PNG (error against layer for the
subjects that expose points, probe errors for all).

Each row is one subject in one dtype on the standard case (`Case.random`): its trace points judged
against the float64 truth (`judging.py`), then the probes (`probes.run_probes`, when that module is
present). A subject that cannot run in a dtype or here (package missing, no CUDA) gets a row that
says why, which is not a failure; a subject that raises is.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
from pathlib import Path

from tqdm import tqdm

from ..judge import Verdict
from ..report import environment
from ..tolerances import AT_LEAST
from .judging import SubjectVerdict, judge_subject, truth_and_reference
from .protocol import Case, SubjectError, SubjectUnavailable, split_name
from .registry import resolve

JUDGED, UNAVAILABLE, ERROR = "judged", "unavailable", "error"


@dataclasses.dataclass
class Row:
    subject: str
    dtype: str
    status: str                                   # judged | unavailable | error
    reason: str = ""                              # why unavailable, or the error raised
    verdict: SubjectVerdict | None = None         # the trace points and next-token
    probes: list = dataclasses.field(default_factory=list)   # probes.ProbeResult

    @property
    def passed(self) -> bool:
        """Unavailable rows are not failures; an error is."""
        if self.status != JUDGED:
            return self.status == UNAVAILABLE
        return self.verdict.passed and all(p.passed for p in self.probes)


def probes_module():
    """`subjects.probes` where it exists (None otherwise: the matrix then has no probe columns)."""
    import importlib
    try:
        return importlib.import_module(f"{__package__}.probes")
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.probes":
            raise
        return None


def judge_row(name, case: Case, baseline=None, with_probes: bool = True) -> Row:
    """One subject (a name, or a subject already resolved) in the case's dtype. A user's (`python:`)
    subject that cannot be imported is bad input (`SubjectError`); a built-in one whose package is
    missing is an unavailable row."""
    dtype = case.dtype_name
    try:
        subject = resolve(name) if isinstance(name, str) else name
    except SubjectUnavailable as err:
        if name.startswith("python:"):
            raise SubjectError(str(err)) from None
        return Row(name, dtype, UNAVAILABLE, str(err))
    if dtype not in subject.precisions:
        return Row(subject.name, dtype, UNAVAILABLE, f"runs in {', '.join(subject.precisions)} only")
    try:
        verdict = judge_subject(subject, case, baseline)
    except SubjectUnavailable as err:
        return Row(subject.name, dtype, UNAVAILABLE, str(err))
    except SubjectError as err:
        return Row(subject.name, dtype, ERROR, str(err))
    except Exception as err:  # noqa: BLE001 - a subject that crashes is its row's verdict, not the matrix's end
        return Row(subject.name, dtype, ERROR, f"the subject raised {type(err).__name__}: {err}"[:400])
    probes = probes_module() if with_probes else None
    results = list(probes.run_probes(subject, case.dtype, device=case.device)) if probes is not None else []
    return Row(subject.name, dtype, JUDGED, verdict=verdict, probes=results)


def run(names: list[str], cases: list[Case], with_probes: bool = True, progress: bool = True) -> list[Row]:
    """Every subject on every case (one case per dtype), in that order."""
    rows = []
    bar = tqdm(total=len(names) * len(cases), desc="matrix", unit="subject", disable=not progress)
    for case in cases:
        baseline = truth_and_reference(case)
        for name in names:
            bar.set_postfix_str(f"{name} {case.dtype_name}")
            rows.append(judge_row(name, case, baseline, with_probes))
            bar.update()
    bar.close()
    return rows


# ---- the report ---------------------------------------------------------------------------------
def margin(v: Verdict | dict) -> float:
    """How close a cell is to its bound: > 1 fails. error/bound for `at most` and the truth rule;
    the disagreeing share over the allowed one for `at least` (routing agreement)."""
    d = v if isinstance(v, dict) else dataclasses.asdict(v)
    if d["rule"] == AT_LEAST:
        allowed, off = 1.0 - d["bound"], 1.0 - d["error"]
        return (0.0 if off <= 0 else math.inf) if allowed <= 0 else off / allowed
    if math.isnan(d["error"]):
        return math.inf
    return d["error"] / d["bound"] if d["bound"] > 0 else (0.0 if d["error"] <= 0 else math.inf)


def versions(device: str) -> dict[str, str]:
    env = environment(device)
    for pkg, module in (("triton", "triton"), ("gpt-oss", "gpt_oss"), ("megatron-core", "megatron.core")):
        env[pkg] = _version(pkg, module)
    return env


def _version(pkg: str, module: str) -> str:
    """The installed distribution's version; else, for source put on PYTHONPATH without package
    metadata (how the optional extras travel to the GPU machine), where it was found."""
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:  # a parent package that is absent
        spec = None
    if spec is None:
        return "not installed"
    return f"source at {os.path.dirname(spec.origin or '?')} (no package metadata)"


def to_json(rows: list[Row], meta: dict) -> dict:
    out = {"meta": meta, "rows": []}
    for r in rows:
        row = {"subject": r.subject, "dtype": r.dtype, "status": r.status, "passed": r.passed, "reason": r.reason}
        if r.verdict is not None:
            row["cells"] = {c.name: dataclasses.asdict(c.verdict) for c in r.verdict.cells}
            row["not_judged"] = dict(r.verdict.not_judged)
            row["floors"] = list(r.verdict.floors)
        row["probes"] = {p.name: {"feature": p.feature, "passed": p.passed, "error": p.error, "bound": p.bound,
                                  "applicable": getattr(p, "applicable", True), "note": getattr(p, "note", "")}
                         for p in r.probes}
        out["rows"].append(row)
    return out


def _cell(d: dict, where: str = "") -> str:
    op = "≥" if d["rule"] == AT_LEAST else "≤"
    word = "PASS" if d["passed"] else "**FAIL**"
    if not d["passed"]:
        op = "<" if d["rule"] == AT_LEAST else ">"
    left = f", {d['excluded']} left out" if d.get("excluded") else ""
    return f"{word} {d['error']:.3g} {op} {d['bound']:.3g}{where}{left}"


def _point_columns(rows: list[dict]) -> list[str]:
    """Point names (per-layer points folded into one column), in trace order, then next-token."""
    cols: dict[str, None] = {}
    for r in rows:
        for name in r.get("cells", {}):
            if name != "next-token":
                cols[split_name(name)[1]] = None
    return ["next-token", *cols]


def _worst(row: dict, point: str) -> tuple[dict, str] | None:
    """The cell of `point` (over every layer) nearest to or furthest past its bound, and where."""
    hits = [(n, d) for n, d in row.get("cells", {}).items() if (split_name(n)[1] == point or n == point)]
    if not hits:
        return None
    name, d = max(hits, key=lambda nd: margin(nd[1]))
    layer = split_name(name)[0]
    return d, ("" if layer is None or len(hits) == 1 else f" @L{layer}")


def to_markdown(data: dict, title: str = "GPT-OSS subjects matrix") -> str:
    meta, rows = data["meta"], data["rows"]
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))]
    lines += ["", "Each cell: the worst layer's measured error against the float64 truth and its bound "
              "(truth rule: 2 × our plain reference's error in the same dtype + the floor; routing: the share "
              "of tokens choosing the truth's expert set, at least the bound; next-token: median KL). "
              "“left out”: tokens a routing near-tie flipped, and the later tokens of their rows, which "
              "read them (docs/subjects.md). Probes are judged on logits alone.", ""]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        part = [r for r in rows if r["dtype"] == dtype]
        points = _point_columns(part)
        probe_cols = list(dict.fromkeys(p for r in part for p in r["probes"]))
        head = ["subject", "verdict", *points, *(f"probe {p}" for p in probe_cols)]
        lines += [f"## {dtype}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for r in part:
            if r["status"] != JUDGED:
                word = "unavailable" if r["status"] == UNAVAILABLE else "**ERROR**"
                lines.append(f"| {r['subject']} | {word}: {r['reason']} |" + " |" * (len(head) - 2))
                continue
            cells = [r["subject"], "PASS" if r["passed"] else "**FAIL**"]
            for p in points:
                w = _worst(r, p)
                cells.append("—" if w is None else _cell(*w))
            for p in probe_cols:
                pr = r["probes"].get(p)
                cells.append("—" if pr is None else "n/a" if not pr.get("applicable", True) else
                             _cell({"rule": "at most", **pr}))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        notes = []
        for r in part:
            if r["status"] != JUDGED:
                continue
            for name, d in r["cells"].items():
                if not d["passed"]:
                    notes.append(f"- {r['subject']} {name}: FAIL {d['kind']} ({d['rule']}, {d['measure']}): "
                                 f"{d['error']:.3g} vs bound {d['bound']:.3g}; {d['reason']}")
            for name, p in r["probes"].items():
                if not p["passed"]:
                    why = f" ({p['note']})" if p.get("note") else ""
                    notes.append(f"- {r['subject']} probe {name}: FAIL — the feature at fault: {p['feature']}{why}")
            for why in dict.fromkeys(p["note"] for p in r["probes"].values() if not p.get("applicable", True)):
                which = [n for n, p in r["probes"].items() if not p.get("applicable", True) and p["note"] == why]
                notes.append(f"- {r['subject']}: probes not applicable, {why}: {', '.join(which)}")
            for floor in r.get("floors", []):
                notes.append(f"- {r['subject']}: its own floor, stated: {floor}")
            for why in dict.fromkeys(r.get("not_judged", {}).values()):
                which = [n for n, w in r["not_judged"].items() if w == why]
                notes.append(f"- {r['subject']}: not judged, {why}: {', '.join(which)}")
        if notes:
            lines += ["Failures and notes:", "", *notes, ""]
    return "\n".join(lines)


STYLES = ("o-", "s--", "^:", "d-.")  # one per dtype


def plot(data: dict, path: str | Path) -> None:
    """Left: error/bound against layer (the worst point of each layer) per subject and dtype, for the
    subjects that expose points; right: each probe's error/bound per subject."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"wspace": 0.6})
    for r in data["rows"]:
        per_layer: dict[int, float] = {}
        for name, d in r.get("cells", {}).items():
            layer = split_name(name)[0]
            if layer is not None:
                per_layer[layer] = max(per_layer.get(layer, 0.0), margin(d))
        if per_layer:
            xs = sorted(per_layer)
            style = STYLES[list(dict.fromkeys(x["dtype"] for x in data["rows"])).index(r["dtype"]) % len(STYLES)]
            left.plot(xs, [max(per_layer[x], 1e-6) for x in xs], style, label=f"{r['subject']} ({r['dtype']})")
    left.axhline(1.0, color="red", linestyle="--", linewidth=1)
    left.set_xlabel("layer"), left.set_ylabel("error / bound (worst point of the layer)"), left.set_yscale("log")
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_title("trace points (> 1 fails)")
    if left.lines[1:]:
        left.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    probed = [r for r in data["rows"] if r["probes"]]
    names = list(dict.fromkeys(p for r in probed for p in r["probes"]))
    if names:
        width = 0.8 / len(probed)
        for i, r in enumerate(probed):
            ys = [max(margin({"rule": "at most", **r["probes"][n]})
                      if n in r["probes"] and r["probes"][n].get("applicable", True) else 0.0, 1e-6) for n in names]
            ys = [min(y, 1e6) for y in ys]  # a probe that failed outright (NaN logits) is drawn at the top
            right.bar([j + i * width for j in range(len(names))], ys, width, label=f"{r['subject']} ({r['dtype']})")
        right.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=60, ha="right",
                         fontsize="x-small")
        right.axhline(1.0, color="red", linestyle="--", linewidth=1)
        right.set_yscale("log"), right.set_ylabel("error / bound"), right.set_title("probes (> 1 fails)")
        right.legend(fontsize="x-small")
    else:
        right.text(0.5, 0.5, "no probes run", ha="center", va="center"), right.set_axis_off()
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.25)
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write(data: dict, report: str | Path) -> Path:
    """The markdown at `report` and its PNG beside it (same name, .png), atomically."""
    from ..report import write_atomic
    report = Path(report)
    png = report.with_suffix(".png")
    report.parent.mkdir(parents=True, exist_ok=True)
    plot(data, png)
    write_atomic(report, to_markdown(data) + f"\n![error against layer and probe errors]({png.name})\n")
    return png


def matrix(names: list[str], case: Case, out_dir: str | Path | None = None, with_probes: bool = True) -> dict:
    """One dtype's matrix as data; `out_dir` gets matrix.md, matrix.png and matrix.json."""
    rows = run(names, [case], with_probes, progress=False)
    data = to_json(rows, {"case": f"{case.spec.name}, batch {case.input_ids.shape[0]} × seq "
                                  f"{case.input_ids.shape[1]}, offset {case.offset}"})
    if out_dir is not None:
        out = Path(out_dir)
        write(data, out / "matrix.md")
        from ..report import write_atomic
        write_atomic(out / "matrix.json", json.dumps(data, indent=1, default=str) + "\n")
    return data
