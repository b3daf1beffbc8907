"""`case export` and `judge` from the command line, with an engine written outside the project
(`someone_elses_engine.py`) run as a separate program on the exported case: the verdict its bug
deserves, and bad cases refused with one line naming the file."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_verify.cli import main

ENGINE = Path(__file__).resolve().parent / "someone_elses_engine.py"
ROOT = ENGINE.parents[2]


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    """An OpenAI-layout (MXFP4) bf16 case, positions past 4096 (YaRN's interpolated range matters)."""
    out = tmp_path_factory.mktemp("cases") / "openai-case"
    assert main(["case", "export", str(out), "--to", "openai", "--dtype", "bfloat16", "--batch", "4",
                 "--seq", "24", "--offset", "4090"]) == 0
    return out


def test_the_case_is_self_contained(case_dir):
    import json
    manifest = json.loads((case_dir / "manifest.json").read_text())
    assert manifest["layout"] == "openai" and manifest["mxfp4"] and manifest["dtype"] == "bfloat16"
    assert manifest["dump"]["logits_shape"] == [4, 24, manifest["spec"]["vocab_size"]]
    assert {"inputs.safetensors", "checkpoint/config.json"} <= set(manifest["sha256"])
    assert not [p for p in case_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_someone_elses_engine_out_of_process(case_dir, tmp_path, capsys):
    dump = tmp_path / "dump.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(ENGINE), str(case_dir), str(dump)], check=True, env=env, cwd=tmp_path)
    capsys.readouterr()
    assert main(["judge", str(case_dir), str(dump), "--name", "their-engine", "--report", str(tmp_path / "v.md")]) == 0
    assert "PASS" in capsys.readouterr().out
    assert "| their-engine | PASS |" in (tmp_path / "v.md").read_text() and (tmp_path / "v.png").is_file()


def test_someone_elses_engine_with_sinks_ignored(case_dir, tmp_path, capsys, monkeypatch):
    """The same program with its bug (run in this process: the file protocol is the same)."""
    dump = tmp_path / "dump.safetensors"
    monkeypatch.setattr(sys, "argv", [str(ENGINE), str(case_dir), str(dump), "sinks-ignored"])
    runpy.run_path(str(ENGINE), run_name="__main__")
    capsys.readouterr()
    assert main(["judge", str(case_dir), str(dump)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: first failing point layers.0.attn_core" in out and "next-token: FAIL free-logits" in out


def test_a_modified_case_is_refused(case_dir, tmp_path, capsys):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(case_dir, copy)
    inputs = copy / "inputs.safetensors"
    data = bytearray(inputs.read_bytes())
    data[-1] ^= 1
    inputs.write_bytes(bytes(data))
    assert main(["judge", str(copy), str(tmp_path / "none.safetensors")]) == 1
    assert "inputs.safetensors: sha256 differs" in capsys.readouterr().err


def test_export_refuses_without_writing(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["case", "export", str(full), "--layers", "1", "--seq", "4"]) == 1
    assert "not empty" in capsys.readouterr().err and [p.name for p in full.iterdir()] == ["keep.txt"]
    assert main(["case", "export", str(tmp_path / "m"), "--to", "megatron", "--mxfp4", "--layers", "1"]) == 1
    assert "megatron layout holds no MXFP4" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing half-written
