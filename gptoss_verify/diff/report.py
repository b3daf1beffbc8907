"""The diff as a reviewer reads it in a PR (markdown) and as a program reads it (JSON)."""
from __future__ import annotations

import dataclasses
import math
import re

from .compare import DiffResult, TensorResult
from .deps import environment, table

_MAX_ROWS = 60  # tensor rows listed before the rest are counted


def verdict(result: DiffResult) -> str:
    if result.error:
        return "DIFFERENT (B could not be read to the end)"
    if result.same_model:
        exact = all(t.status == "bit-exact" for t in result.tensors)
        return "SAME MODEL (bit-exact)" if exact else "SAME MODEL (within the stated rounding)"
    n = len(result.findings)
    parts = [f"{n} tensor(s) differ"] if n else []
    if not result.config_same:
        parts.append("configs differ")
    return "DIFFERENT: " + ", ".join(parts)


def summary_lines(result: DiffResult) -> list[str]:
    """What the command prints: one line per finding, then the verdict."""
    lines = []
    for f in result.config:
        if not f.same:
            lines.append(f"CONFIG {f.field}: A {f.a!r}, B {f.b!r}" + (" (informational)" if f.kind == "info" else ""))
    for t in result.findings:
        lines.append(f"{t.status.upper()} {t.name}: " + (t.diagnosis.describe() if t.diagnosis else _stats_text(t)))
    if result.error:
        lines.append(f"ERROR reading: {result.error}")
    c = result.consequence
    if c is not None and c.ran and c.kl_mean is not None:
        part = f"; first parts at {c.first_part.name}" if c.first_part else "; the runs never part"
        lines.append(f"consequence on {c.tokens} tokens: KL(A||B) mean {c.kl_mean:.3g}, argmax agreement "
                     f"{c.argmax_agreement:.3f}{part}")
    elif c is not None:
        lines.append(f"consequence: {c.reason}")
    lines.append(verdict(result))
    return lines


def _stats_text(t: TensorResult) -> str:
    if t.status in ("missing", "extra"):
        return f"A {t.a}, B {t.b}"
    if t.stats is None:
        return f"A {t.a}, B {t.b}: no known transform explains it"
    s = t.stats
    return (f"no known transform; max abs {s.max_abs:.3g}, rel L2 {s.rel_l2:.3g}, "
            f"{100 * s.differing_share:.3g}% of elements differ")


def _group(name: str) -> str:
    return re.sub(r"\.(\d+)\.", ".*.", name, count=1)


def markdown(result: DiffResult) -> str:
    a, b = result.a, result.b
    lines = ["# Checkpoint diff", "", f"**Verdict: {verdict(result)}**", "",
             table([("A (reference)", f"`{a.path}`", a.layout, a.experts, a.dtype),
                    ("B", f"`{b.path}`", b.layout, b.experts, b.dtype)],
                   ["", "path", "layout", "experts", "other tensors"]), ""]
    if result.error:
        lines += [f"**B could not be read to the end**: {result.error}", ""]
    lines += _findings(result) + _config(result) + _consequence(result) + _tensors(result)
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    lines += ["## Environment", "", table(list(environment().items()), ["", ""]), ""]
    return "\n".join(lines)


def _findings(result: DiffResult) -> list[str]:
    found = result.findings
    if not found:
        return []
    rows = []
    for t in found[:_MAX_ROWS]:
        d = t.diagnosis
        rows.append((f"`{t.name}`", "" if t.layer is None else t.layer, t.status,
                     f"**{d.transform}**" if d else "unexplained",
                     ("exact" if d.exact else f"residual {d.residual:.3g}") if d else "",
                     d.detail if d else _stats_text(t)))
    out = ["## Findings", "", "Each tensor of B that is not A's within rounding; the diagnosis names the known "
           "transform that maps A onto B (see docs/diff.md).", "",
           table(rows, ["tensor", "layer", "status", "diagnosis", "", "detail"]), ""]
    if len(found) > _MAX_ROWS:
        out += [f"... and {len(found) - _MAX_ROWS} more (see the JSON).", ""]
    stats = [t for t in found if t.stats is not None and not t.diagnosis][:_MAX_ROWS]
    if stats:
        rows = [(f"`{t.name}`", f"{t.stats.max_abs:.3g}", f"{t.stats.rel_l2:.3g}", f"{100 * t.stats.differing_share:.3g}%",
                 t.stats.ulp_dtype, ", ".join(f"{k}: {v}" for k, v in t.stats.ulp_histogram.items() if v),
                 t.stats.nonfinite) for t in stats]
        out += ["### Error statistics of the unexplained tensors", "",
                table(rows, ["tensor", "max abs", "rel L2", "elements differing", "ULPs in", "ULP histogram",
                             "NaN/Inf"]), ""]
    return out


def _config(result: DiffResult) -> list[str]:
    differing = [f for f in result.config if not f.same]
    out = ["## Config", ""]
    if not differing:
        return out + [f"All {len(result.config)} compared fields are equal (numerics first: "
                      + ", ".join(f.field for f in result.config if f.kind == "numerics") + ").", ""]
    rows = [(f.field, f.kind, _short(f.a), _short(f.b)) for f in differing]
    return out + [table(rows, ["field", "kind", "A", "B"]), "",
                  f"{len(result.config) - len(differing)} other fields are equal. `info` fields are reported, "
                  "not failed.", ""]


def _short(v) -> str:
    text = repr(v)
    return text if len(text) < 60 else text[:57] + "..."


def _consequence(result: DiffResult) -> list[str]:
    c = result.consequence
    if c is None:
        return []
    out = ["## Consequence", ""]
    if not c.ran:
        return out + [f"Not run: {c.reason}.", ""]
    out.append(f"Both checkpoints through our model (reference blocks, float32 activations, each with its own "
               f"config) on the same {c.tokens} seeded tokens, {c.layers_run} layer(s) one at a time"
               + (f"; {c.reason}" if c.reason else "") + ".")
    out.append("")
    rows = []
    if c.kl_mean is not None:
        rows += [("KL(A ‖ B), mean over positions (nats)", f"{c.kl_mean:.3g}"),
                 ("KL(A ‖ B), largest", f"{c.kl_max:.3g}"),
                 ("argmax agreement", f"{c.argmax_agreement:.3f}"),
                 ("vocabulary compared", c.vocab_compared)]
    rows.append(("first trace point where they part",
                 f"`{c.first_part.name}` (max abs {c.first_part.max_abs:.3g}, relative {c.first_part.rel:.3g})"
                 if c.first_part else "none: identical at every point"))
    out += [table(rows, ["", ""]), ""]
    parted = [g for g in c.layers if g.rel or g.routing < 1]
    if parted:
        out += [table([(g.layer, f"{g.rel:.3g}", f"{g.routing:.3f}") for g in c.layers],
                      ["layer", "residual stream max|A-B|/max|A|", "routing agreement"]), ""]
    return out


def _tensors(result: DiffResult) -> list[str]:
    groups: dict[tuple[str, str, str], list[TensorResult]] = {}
    for t in result.tensors:
        if t.ok:
            groups.setdefault((_group(t.name), t.status, t.how), []).append(t)
    rows = [(f"`{g}`", len(ts), status, how or "", ts[0].a, ts[0].b) for (g, status, how), ts in groups.items()]
    ok = sum(t.ok for t in result.tensors)
    out = ["## Tensors within rounding", "",
           f"{ok} of {len(result.tensors)} tensors are A's exactly or within the exact rounding of the lower side."]
    if rows:
        out += ["", table(rows[:_MAX_ROWS], ["tensor group", "count", "status", "how", "A", "B"])]
    return out + [""]


def to_json(result: DiffResult) -> dict:
    def clean(obj):
        if isinstance(obj, float) and not math.isfinite(obj):
            return str(obj)
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj
    data = dataclasses.asdict(result)
    data["verdict"] = verdict(result)
    data["same_model"] = result.same_model
    for t, row in zip(result.tensors, data["tensors"]):
        row["layer"] = t.layer
    return clean(data)
