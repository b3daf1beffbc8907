"""Markdown reports (tabulate): the environment block every report starts with, and the parity report."""
from __future__ import annotations

import dataclasses
import datetime
import math
import platform
from pathlib import Path

import torch
from tabulate import tabulate

from . import __version__
from .dtypes import dtype_name
from .formats.fileio.partials import write_file
from .tolerances import as_markdown_rows, tolerance

TRUTH_RULE = (
    f"**The truth rule.** In float64, ours and transformers must agree to {tolerance('float64', 'oracle').limit:g} "
    "(relative to the tensor's largest value). In a low precision, our float64 reference fed the same inputs is the "
    "truth: ours and transformers are each measured against it, and ours passes when its error is "
    f"at most {tolerance('bfloat16', 'truth').factor:g}x transformers' error plus a floor of about one unit in the "
    "last place (the rule of flash-attention's tests). Teacher-forced rows feed each of our blocks the oracle's input "
    "of that block, so the first failing row is where a bug is. Free-running rows run both models end "
    "to end; in a low precision their per-point errors are reported as drift and judged only on the "
    "next-token distributions (median KL).")


def environment(device: str = "cpu") -> dict[str, str]:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gptoss-verify": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = "not installed"
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = str(torch.version.cuda)
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            pass
    return env


def table(rows, headers, floatfmt=".3g") -> str:
    return tabulate(rows, headers=headers, tablefmt="github", floatfmt=floatfmt)


def write_atomic(path: str | Path, text: str) -> None:
    """A whole text file, atomically, through an owned partial (formats/fileio/partials.py)."""
    write_file(path, text)


def _fmt(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _divergence(result) -> str:
    fd = result.first_divergence
    if fd is None:
        return "none"
    return (f"`{fd.name}` ({fd.mode}, {fd.kind}: {_fmt(fd.measure)} > bound {_fmt(fd.bound)}"
            + (f"; oracle {_fmt(fd.oracle_measure)}" if not math.isnan(fd.oracle_measure) else "") + ")")


def parity_markdown(results: list, device: str = "cpu") -> str:
    ok = all(r.passed for r in results)
    spec = results[0].case.spec
    case0 = results[0].case
    lines = [f"# Parity report: gptoss-verify vs transformers ({spec.name})", "",
             f"**Verdict: {'PASS' if ok else 'FAIL'}**"
             + ("" if ok else f": first divergence {_divergence(next(r for r in results if not r.passed))}"), ""]
    env = environment(device)
    env.update({"seed": str(case0.seed), "batch x seq": f"{case0.batch} x {case0.seq}",
                "position offset": str(case0.offset), "backend": case0.backend,
                "weights": case0.weights_source
                + ("; streamed one decoder layer at a time" if getattr(case0, "stream_layers", False) else ""),
                "injected faults": ", ".join(case0.faults) or "none"})
    lines += ["## Environment", "", table(list(env.items()), ["", ""]), ""]
    lines += ["## Config", "", table([(k, v) for k, v in dataclasses.asdict(spec).items()], ["field", "value"]), ""]
    lines += [TRUTH_RULE, ""]
    summary = [(dtype_name(r.case.dtype), r.case.profile, "PASS" if r.passed else "FAIL", _divergence(r),
                f"{100 * r.clamp_share:.1f}%", r.router_ties, r.tie_tokens_excluded,
                f"{100 * r.routing_agreement:.1f}%", f"{100 * r.argmax_agreement:.1f}%", _fmt(r.kl_ours),
                f"{r.seconds:.1f}")
               for r in results]
    lines += ["## Cases", "", table(summary, ["dtype", "weights", "verdict", "first divergence",
                                              "clamp active", "router ties", "tie tokens left out",
                                              "routing agreement", "argmax agreement",
                                              "mean KL vs reference", "seconds"]), "",
              "*clamp active*: share of the chosen experts' SwiGLU elements where a clamp acts. "
              "*router ties*: tokens whose k-th and (k+1)-th router logits are within one unit in the "
              "last place (their choice is implementation-defined; reported, not failed). "
              "*tie tokens left out*: teacher-forced tokens where the two sides chose different "
              "experts, left out of the comparisons after routing.", ""]
    phases = list(dict.fromkeys(p for r in results for p in r.phases))  # in the order they ran
    lines += ["### Where the time went (seconds)", "",
              table([(dtype_name(r.case.dtype), r.case.profile, *[f"{r.phases.get(p, 0):.1f}" for p in phases])
                     for r in results], ["dtype", "weights", *phases]), ""]
    for r in results:
        lines += [f"## {dtype_name(r.case.dtype)}, {r.case.profile} weights", ""]
        rows = [(x.mode, x.name, x.kind, _fmt(x.measure), _fmt(x.oracle_measure), _fmt(x.bound),
                 "ok" if x.passed else "FAIL", _fmt(x.max_abs), _fmt(x.rel_l2), _fmt(x.cosine), _fmt(x.max_ulp))
                for x in r.rows
                if x.mode == "teacher-forced" or x.point in ("resid_mlp", "logits") or not x.passed]
        lines += [table(rows, ["mode", "point", "rule", "ours", "oracle", "bound", "verdict",
                               "max abs vs oracle", "rel L2 vs oracle", "cosine", "max ULP"]), ""]
    lines += ["## Tolerances", "", table(as_markdown_rows(), ["dtype", "kind", "rule: measure", "limit / floor", "factor", "reason"]), ""]
    return "\n".join(lines)


def parity_json(results: list) -> dict:
    out = []
    for r in results:
        c = r.case
        out.append({
            "dtype": dtype_name(c.dtype), "profile": c.profile, "seed": c.seed, "batch": c.batch,
            "seq": c.seq, "offset": c.offset, "faults": list(c.faults), "backend": c.backend,
            "passed": r.passed,
            "first_divergence": None if r.first_divergence is None else dataclasses.asdict(r.first_divergence),
            "clamp_share": r.clamp_share, "router_ties": r.router_ties,
            "tie_tokens_excluded": r.tie_tokens_excluded, "routing_agreement": r.routing_agreement,
            "argmax_agreement": r.argmax_agreement, "kl": r.kl_ours, "seconds": r.seconds, "phases": r.phases,
            "rows": [dataclasses.asdict(x) for x in r.rows],
        })
    return {"environment": environment(), "spec": dataclasses.asdict(results[0].case.spec), "cases": out}
