"""`gptoss-verify diff A B [--report PATH] [--json PATH]`: does B hold the same model as A?

Exit 0 when it does (bit-exact, or within the exact rounding of the lower side, per tensor, and
configs equal); 1 when it does not, or on bad input (one line on stderr naming file, tensor or
field); 2 on usage (argparse).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .compare import diff
from .deps import CheckpointError, ConfigError, write_atomic
from .report import markdown, summary_lines, to_json

def run(a: str | Path, b: str | Path, *, report: str | Path | None = None, json_path: str | Path | None = None,
        tokens: int = 32, seed: int = 0, consequence: bool = True, consequence_layers: int | None = None,
        progress: bool = True, out=None) -> int:
    """Compare, print one line per finding and the verdict, write the reports; 0 same model, 1 not
    or bad input."""
    out = out or sys.stdout
    try:
        result = diff(a, b, consequence=consequence, tokens=tokens, seed=seed,
                      consequence_layers=consequence_layers, progress=progress)
    except (CheckpointError, ConfigError) as err:
        print(f"gptoss-verify diff: error: {err}", file=sys.stderr)
        return 1
    if report:
        write_atomic(report, markdown(result))
    if json_path:
        write_atomic(json_path, json.dumps(to_json(result), indent=2))
    for line in summary_lines(result):
        print(line, file=out)
    return 0 if result.same_model else 1
