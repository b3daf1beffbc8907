"""The random weights exercise every branch, reproducibly."""
from __future__ import annotations

import torch

from gptoss_verify.config import preset
from gptoss_verify.schema import canonical_shapes
from gptoss_verify.weights import iter_random_weights, random_weights

TINY = preset("tiny")


def test_every_tensor_has_its_shape_and_is_bf16_exact():
    w = random_weights(TINY, 0, "typical", torch.float64)
    assert {n: tuple(t.shape) for n, t in w.items()} == canonical_shapes(TINY)
    for t in w.values():
        assert torch.equal(t, t.to(torch.bfloat16).to(torch.float64))


def test_biases_non_zero_and_sinks_matter():
    for profile in ("typical", "stress"):
        w = random_weights(TINY, 1, profile, torch.float32)
        for name, t in w.items():
            if name.endswith("bias"):
                assert (t != 0).float().mean() > 0.9, name
        sinks = w["model.layers.0.self_attn.sinks"]
        assert sinks.abs().max() >= (50 if profile == "stress" else 2)


def test_stress_has_overflowing_sinks_and_near_tied_router_rows():
    w = random_weights(TINY, 0, "stress", torch.float64)
    assert w["model.layers.0.self_attn.sinks"].max() == 100
    assert w["model.layers.0.self_attn.sinks"].min() == -100
    router = w["model.layers.0.mlp.router.weight"]
    differs = router[0] != router[1]
    assert differs.sum() == 1 and differs[0]  # one element, one bf16 ulp apart
    assert torch.nextafter(router[0, 0].bfloat16(), torch.tensor(1e9).bfloat16()) == router[1, 0].bfloat16()


def test_reproducible_and_subset_independent():
    a = dict(iter_random_weights(TINY, 3))
    b = dict(iter_random_weights(TINY.with_layers(2), 3))
    for name, t in b.items():
        assert torch.equal(a[name], t), name
    c = random_weights(TINY, 4)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
