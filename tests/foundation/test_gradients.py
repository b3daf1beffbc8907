"""For a scalar loss on the logits, every parameter's gradient in ours matches the oracle's."""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.config import preset
from gptoss_verify.parity.gradients import compare_gradients


@pytest.mark.parametrize("profile", ["typical", "stress"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_every_parameter_gradient_matches(dtype, profile):
    results = compare_gradients(preset("tiny"), dtype, seed=2, profile=profile, offset=4090)
    assert len(results) == len(list(preset("tiny").layer_types)) * 17 + 3
    bad = [(r.name, r.rel_l2) for r in results if not r.passed]
    assert not bad, bad[:5]
