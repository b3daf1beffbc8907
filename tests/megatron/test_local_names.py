"""`convert --to megatron --megatron-names local`: the local layer spec's tensor names (megatron-core's
SequentialMLP), which the reader takes as it takes the TE names, and `diff` reads either."""
from __future__ import annotations

import torch

from gptoss_verify.cli import main
from gptoss_verify.formats import hf
from gptoss_verify.formats.megatron import legacy, mapping


def test_local_names_written_read_and_diffed(tiny_weights, tmp_path):
    spec, weights = tiny_weights
    src = tmp_path / "hf"
    hf.write(iter(weights.items()), spec, src)
    te, local = tmp_path / "te", tmp_path / "local"
    assert main(["convert", str(src), str(te), "--to", "megatron", "--ep", "2"]) == 0
    assert main(["convert", str(src), str(local), "--to", "megatron", "--ep", "2", "--megatron-names", "local"]) == 0
    stored = torch.load(legacy.open_checkpoint(local).files[(0, 0, 1)], weights_only=True)["model"]
    assert mapping.name("fc1_weight", 0, 3, mapping.LOCAL) in stored           # local_experts.3.linear_fc1
    assert mapping.name("input_norm", 1, names=mapping.LOCAL) in stored
    assert mapping.name("fc1_weight", 0, 3) not in stored and mapping.name("input_norm", 1) not in stored
    _, a = legacy.read(te)
    _, b = legacy.read(local)
    b = dict(b)
    for name, t in a:
        assert torch.equal(b.pop(name), t), name
    assert not b
    assert main(["diff", str(te), str(local), "--no-consequence", "--json", str(tmp_path / "d.json")]) == 0


def test_local_names_only_for_the_legacy_layout(tiny_weights, tmp_path):
    spec, weights = tiny_weights
    src = tmp_path / "hf"
    hf.write(iter(weights.items()), spec, src)
    assert main(["convert", str(src), str(tmp_path / "d"), "--to", "megatron-dist", "--megatron-names", "local"]) == 1
    assert not (tmp_path / "d").exists()
