"""`gptoss-verify parity --checkpoint DIR` compares on the weights of a checkpoint on disk."""
from __future__ import annotations

import pytest

from gptoss_verify.cli import main


@pytest.mark.parametrize("fmt,mxfp4", [("hf", True), ("hf", False), ("openai", True)])
def test_parity_on_a_written_checkpoint(tmp_path, fmt, mxfp4):
    ckpt = tmp_path / "ckpt"
    args = ["make-checkpoint", str(ckpt), "--preset", "tiny", "--seed", "11", "--to", fmt]
    assert main(args + (["--mxfp4"] if mxfp4 else [])) == 0
    report = tmp_path / "parity.md"
    assert main(["parity", "--checkpoint", str(ckpt), "--dtype", "float64", "--seq", "24",
                 "--report", str(report)]) == 0
    assert "**Verdict: PASS**" in report.read_text()
    assert main(["parity", "--checkpoint", str(ckpt), "--dtype", "float64", "--seq", "24",
                 "--inject", "gate-up-halves", "--report", str(report)]) == 1
    assert "layers.0.mlp_out" in report.read_text()
