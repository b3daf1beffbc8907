"""The layers do not import upwards: model/ and kernels/ never import transformers, the oracles,
parity/ or the backend table above them, and model/ never imports kernels/ (`backends.py` joins them)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gptoss_verify"
ABOVE_BOTH = ("transformers", "gptoss_verify.oracles", "gptoss_verify.parity", "gptoss_verify.backends")
FORBIDDEN = {"model": ABOVE_BOTH + ("gptoss_verify.kernels",), "kernels": ABOVE_BOTH}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what a source file imports, relative imports resolved; for `from X import y`
    both X and X.y (y may be a module)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return found


def test_imports_are_resolved():
    """The resolver itself: model/model.py's relative imports come out absolute."""
    found = imported_modules(PACKAGE / "model" / "model.py")
    assert {"gptoss_verify.trace", "gptoss_verify.config", "gptoss_verify.model.attention"} <= found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_upward_import_in_source(folder):
    for path in (PACKAGE / folder).rglob("*.py"):
        for name in imported_modules(path):
            bad = [f for f in FORBIDDEN[folder] if name == f or name.startswith(f + ".")]
            assert not bad, f"{folder}/{path.name} imports {name}"


def test_running_our_model_loads_no_transformers():
    code = ("import sys, torch\n"
            "from gptoss_verify.config import preset\n"
            "from gptoss_verify.weights import random_weights\n"
            "from gptoss_verify.model import Transformer\n"
            "s = preset('tiny')\n"
            "Transformer.from_state_dict(s, random_weights(s))(torch.zeros(1, 3, dtype=torch.long))\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
