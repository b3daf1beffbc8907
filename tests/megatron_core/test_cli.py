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


def test_cli_engine_megatron_core_torch_dist_at_tp2(tmp_path, capsys):
    """A torch_dist checkpoint converted for tp 2 (padded vocabulary) runs at that grid by default,
    two spawned ranks, PASS; `--tp 1` loads the same global tensors at tp 1 (resharded). A grid its
    files cannot load at is one error naming the checkpoint, before any process starts."""
    src = tmp_path / "hf"
    hf.write(iter(random_weights(SPEC, 9, "typical", torch.float32).items()), SPEC, src)
    meg = tmp_path / "dist"
    assert main(["convert", str(src), str(meg), "--to", "megatron-dist", "--tp", "2", "--pad-vocab"]) == 0
    capsys.readouterr()
    out = tmp_path / "r.json"
    assert main(["sharded-forward", str(meg), "--reference", str(src), "--engine", "megatron-core", "--seq", "20",
                 "--json", str(out)]) == 0
    said = capsys.readouterr().out
    assert "tp=2 ep=1 on megatron-dist float64: PASS" in said and "router-float32" in said
    data = json.loads(out.read_text())
    assert data["passed"] and data["grid"] == [2, 1]
    assert main(["sharded-forward", str(meg), "--reference", str(src), "--engine", "megatron-core", "--seq", "20",
                 "--tp", "1", "--dtype", "float32"]) == 0
    assert "tp=1 ep=1 on megatron-dist float32: PASS" in capsys.readouterr().out
    # refused before starting: ep 3 does not divide 8 experts; legacy files at another grid than theirs
    assert main(["sharded-forward", str(meg), "--reference", str(src), "--engine", "megatron-core", "--ep", "3"]) == 1
    err = capsys.readouterr().err
    assert str(meg) in err and "ep=3" in err
    legacy = tmp_path / "legacy"
    assert main(["convert", str(src), str(legacy), "--to", "megatron"]) == 0
    assert main(["sharded-forward", str(legacy), "--reference", str(src), "--engine", "megatron-core",
                 "--tp", "2"]) == 1
    err = capsys.readouterr().err
    assert str(legacy) in err and "only at that grid" in err
    # our own sharded forward runs the files' grid: --tp is a usage error there
    assert main(["sharded-forward", str(legacy), "--reference", str(src), "--tp", "2"]) == 2
