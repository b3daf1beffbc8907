"""The matrix: subjects as rows, judged cells (trace points, next-token; probes once they exist) as
columns, each PASS/FAIL with its measured error and bound. Markdown, JSON, and a PNG of error
against layer for the subjects that expose points."""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from .judging import SubjectVerdict, judge_subject, truth_and_reference
from .protocol import Case, SubjectUnavailable, split_name
from .registry import resolve


def matrix(names: list[str], case: Case, out_dir: str | Path | None = None) -> dict:
    """Judge every subject on `case`; write matrix.md/.json/.png under `out_dir` when given."""
    baseline = truth_and_reference(case)
    rows: dict[str, SubjectVerdict | str] = {}
    for name in tqdm(names, desc="subjects", unit="subject"):
        try:
            rows[name] = judge_subject(resolve(name), case, baseline)
        except SubjectUnavailable as err:
            rows[name] = f"unavailable: {err}"
    data = {"dtype": case.dtype_name, "subjects": {
        n: v if isinstance(v, str) else {c.name: {"passed": c.verdict.passed, "error": c.verdict.error,
                                                 "bound": c.verdict.bound, "kind": c.verdict.kind}
                                         for c in v.cells} for n, v in rows.items()}}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "matrix.json").write_text(json.dumps(data, indent=2) + "\n")
        (out / "matrix.md").write_text(to_markdown(data))
        plot(data, out / "matrix.png")
    return data


def to_markdown(data: dict) -> str:
    cols = list(dict.fromkeys(c for v in data["subjects"].values() if isinstance(v, dict) for c in v))
    lines = [f"# Subjects matrix ({data['dtype']})", "", "| subject | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, v in data["subjects"].items():
        if isinstance(v, str):
            lines.append(f"| {name} | " + v + " |" + " |" * (len(cols) - 1))
            continue
        cells = [("—" if c not in v else f"{'PASS' if v[c]['passed'] else 'FAIL'} {v[c]['error']:.3g} ≤ {v[c]['bound']:.3g}"
                  .replace("FAIL", "**FAIL**")) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, v in data["subjects"].items():
        if not isinstance(v, dict):
            continue
        per_layer: dict[int, float] = {}
        for cell, m in v.items():
            layer = split_name(cell)[0]
            if layer is not None and m["kind"] != "routing":
                per_layer[layer] = max(per_layer.get(layer, 0.0), m["error"])
        if per_layer:
            ax.plot(sorted(per_layer), [per_layer[k] for k in sorted(per_layer)], marker="o", label=name)
    ax.set_xlabel("layer"), ax.set_ylabel("max error against the float64 truth"), ax.set_yscale("log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
