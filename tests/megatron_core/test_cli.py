"""`gptoss-verify sharded-forward --engine megatron-core`: 0 when megatron-core's forward on our
files passes at every point (the floor said), 1 for a checkpoint that is not Megatron, 2 for usage."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("megatron.core")

from gptoss_verify.cli import main  # noqa: E402
from gptoss_verify.formats import hf  # noqa: E402
from gptoss_verify.weights import random_weights  # noqa: E402

from .conftest import SPEC  # noqa: E402


def test_cli_engine_megatron_core(tmp_path, capsys):
    src = tmp_path / "hf"
    hf.write(iter(random_weights(SPEC, 8, "typical", torch.float32).items()), SPEC, src)
    meg = tmp_path / "meg"
    assert main(["convert", str(src), str(meg), "--to", "megatron", "--megatron-names", "local"]) == 0
    capsys.readouterr()
    out = tmp_path / "r.json"
    assert main(["sharded-forward", str(meg), "--reference", str(src), "--engine", "megatron-core", "--seq", "20",
                 "--dtype", "float64", "--json", str(out), "--report", str(tmp_path / "r.md")]) == 0
    said = capsys.readouterr().out
    assert "PASS" in said and "router-float32" in said
    data = json.loads(out.read_text())
    assert data["passed"] and data["redirects"] and data["floors"]
    assert "first divergence" not in (tmp_path / "r.md").read_text()
    assert main(["sharded-forward", str(src), "--reference", str(src), "--engine", "megatron-core"]) == 1
    assert str(src) in capsys.readouterr().err
    assert main(["sharded-forward", str(meg), "--reference", str(src), "--engine", "nemo"]) == 2
