"""Full width (gpt-oss-20b shapes, the first layers): a transpose of the square down_proj is found
by values, the consequence runs, and memory stays bounded by a layer, not by the model.

GBs are written: runs only with GPTOSS_RUN_SLOW=1 or `-m fullsize`. GPTOSS_DIFF_LAYERS sets the
number of layers (default 2); the bound below does not grow with it.
"""
from __future__ import annotations

import os

import pytest
import torch

from gptoss_verify.config import preset
from gptoss_verify.convert import PeakRSS
from gptoss_verify.diff.compare import diff
from gptoss_verify.formats import hf
from gptoss_verify.weights import iter_random_weights

from . import corpus as c

pytestmark = pytest.mark.fullsize
GIB = 2 ** 30


def test_full_width_pair_bounded_memory(tmp_path):
    layers = int(os.environ.get("GPTOSS_DIFF_LAYERS", "2"))
    spec = preset("gpt-oss-20b").with_layers(layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stream = ((n, t.cpu()) for n, t in iter_random_weights(spec, seed=1, device=device))
    hf.write(stream, spec, tmp_path / "a", mxfp4=True)
    down = "model.layers.1.mlp.experts.down_proj"  # [32, 2880, 2880]: square
    c.rewrite(tmp_path / "a", tmp_path / "b", "hf", {down: c.transpose}, dense=True)
    with PeakRSS() as mem:
        result = diff(tmp_path / "a", tmp_path / "b", tokens=8)
    (finding,) = result.findings
    assert finding.name == down and finding.diagnosis.transform == "transpose" and finding.diagnosis.exact
    assert result.consequence.first_part.name == "layers.1.mlp_out"
    # one layer of experts per side (B dense bf16: 1.6 GiB; A decoded for the forward: 1.6 GiB),
    # the diagnosis' copies of one expert tensor, and both embeddings (1.1 GiB each)
    print(f"peak RSS {mem.peak_bytes / GIB:.2f} GiB for {layers} full-width layers")
    assert mem.peak_bytes < 12 * GIB
