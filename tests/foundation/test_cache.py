"""KV-cache decoding token by token equals the full forward; sliding layers keep only the window."""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.config import preset
from gptoss_verify.model import Transformer
from gptoss_verify.weights import random_weights


@pytest.mark.parametrize("profile", ["typical", "stress"])
@pytest.mark.parametrize("prefill", [1, 7, 16, 23])
def test_decode_equals_full_forward(prefill, profile):
    spec = preset("tiny")
    model = Transformer.from_state_dict(spec, random_weights(spec, 5, profile, torch.float64))
    ids = torch.randint(0, spec.vocab_size, (2, 45), generator=torch.Generator().manual_seed(prefill))
    offset = 4000
    with torch.no_grad():
        full = model(ids, offset)
        cache = model.new_cache()
        parts = [model(ids[:, :prefill], offset, cache)]
        for p in range(prefill, ids.shape[1]):
            parts.append(model(ids[:, p:p + 1], offset + p, cache))
            for i, layer_cache in enumerate(cache):
                if spec.is_sliding(i):
                    assert layer_cache.length <= spec.sliding_window - 1
                else:
                    assert layer_cache.length == p + 1
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-12 * full.abs().max().item())


def test_cache_refuses_a_gap():
    spec = preset("tiny")
    model = Transformer.from_state_dict(spec, random_weights(spec, 0, "typical", torch.float32))
    cache = model.new_cache()
    ids = torch.zeros(1, 4, dtype=torch.long)
    model(ids, 0, cache)
    with pytest.raises(ValueError, match="KV cache holds positions up to 4"):
        model(ids, 10, cache)
