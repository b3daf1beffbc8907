"""model/ and kernels/ never import transformers or the oracles."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gptoss_verify"


@pytest.mark.parametrize("folder", ["model", "kernels"])
def test_no_transformers_import_in_source(folder):
    for path in (PACKAGE / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.level and (node.module or "").startswith("oracles"):
                    names.append("oracles")
            for name in names:
                assert not name.startswith("transformers"), f"{path.name} imports {name}"
                assert "oracles" not in name.split("."), f"{path.name} imports {name}"


def test_running_our_model_loads_no_transformers():
    code = ("import sys, torch\n"
            "from gptoss_verify.config import preset\n"
            "from gptoss_verify.weights import random_weights\n"
            "from gptoss_verify.model import Transformer\n"
            "s = preset('tiny')\n"
            "Transformer.from_state_dict(s, random_weights(s))(torch.zeros(1, 3, dtype=torch.long))\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
