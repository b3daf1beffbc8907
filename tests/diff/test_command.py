"""The entry point: exit status, the markdown and JSON reports, bad input and usage, and the
consequence (where two runs part, what it does to the next-token distribution)."""
from __future__ import annotations

import json

import pytest

from gptoss_verify.cli import main
from gptoss_verify.diff.compare import diff

from . import corpus as c

DOWN = "model.layers.1.mlp.experts.down_proj"


@pytest.fixture(scope="module")
def transposed(base, tmp_path_factory):
    """The square model with layer 1's down_proj transposed (every shape still right)."""
    return c.rewrite(base["square-hf"], tmp_path_factory.mktemp("t") / "b", "hf", {DOWN: c.transpose})


def test_exit_status_and_reports(base, transposed, tmp_path, capsys):
    assert main(["diff", str(base["mx"]), str(base["megatron"]), "--report", str(tmp_path / "same.md")]) == 0
    assert capsys.readouterr().out.strip().endswith("SAME MODEL (within the stated rounding)")
    assert "**Verdict: SAME MODEL" in (tmp_path / "same.md").read_text()
    assert main(["diff", str(base["square-hf"]), str(transposed), "--report", str(tmp_path / "r.md"),
                 "--json", str(tmp_path / "r.json")]) == 1
    assert f"DIFFERS {DOWN}: transpose (exact)" in capsys.readouterr().out
    text = (tmp_path / "r.md").read_text()
    assert "**Verdict: DIFFERENT: 1 tensor(s) differ**" in text and "**transpose**" in text and "## Consequence" in text
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["same_model"] is False
    (finding,) = [t for t in data["tensors"] if t["status"] not in ("bit-exact", "same-values", "rounding")]
    assert finding["name"] == DOWN and finding["layer"] == 1 and finding["diagnosis"]["transform"] == "transpose"


def test_consequence_shows_where_the_runs_part(base, transposed):
    result = diff(base["square-hf"], transposed)
    cq = result.consequence
    assert cq.ran and cq.layers_run == 4
    assert cq.first_part.name == "layers.1.mlp_out"  # down_proj is first used there
    assert cq.layers[0].rel == 0.0 and cq.layers[1].rel > 0 and cq.layers[1].routing == 1.0
    assert cq.kl_mean > 0 and cq.argmax_agreement < 1.0
    limited = diff(base["square-hf"], transposed, consequence_layers=2).consequence
    assert limited.layers_run == 2 and limited.kl_mean is None and limited.first_part.name == "layers.1.mlp_out"


def test_bad_input_is_one_line(base, tmp_path, capsys):
    assert main(["diff", str(base["hf"]), str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "absent") in err[0] and "does not exist" in err[0]
    bad = c.edit_safetensors(base["hf"], tmp_path / "bad", {}, config={"num_attention_heads": 7})
    assert main(["diff", str(base["hf"]), str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and "num_heads" in err[0]


@pytest.mark.parametrize("argv", [["diff", "a"], ["diff", "a", "b", "--tokens", "0"], ["diff", "a", "b", "--bogus"]])
def test_usage_exits_2(argv):
    assert main(argv) == 2


def test_json_to_stdout_holds_the_json_alone(base, capsys):
    assert main(["diff", str(base["mx"]), str(base["megatron"]), "--no-consequence", "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["same_model"] is True
    assert captured.err.strip().endswith("SAME MODEL (within the stated rounding)")
