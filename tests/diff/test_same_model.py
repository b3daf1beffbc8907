"""Identical models in different layouts are the same model; rounding to a lower side is stated
per tensor; a change no transform explains gets error statistics, not a made-up diagnosis."""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.diff.compare import diff
from gptoss_verify.formats import hf
from gptoss_verify.weights import iter_random_weights

from . import corpus as c
from .conftest import TINY


@pytest.mark.parametrize("a,b", [("mx", "openai"), ("mx", "megatron"), ("mx", "dist"), ("mx", "dequantized"),
                                 ("openai", "megatron"), ("dist", "dequantized"), ("hf", "hf-megatron"),
                                 ("openai", "dist"), ("dequantized", "megatron"), ("hf-megatron", "hf")])
def test_identical_models_in_other_layouts_are_the_same(base, a, b):
    result = diff(base[a], base[b])
    assert result.same_model, [f"{t.name}: {t.status}" for t in result.findings]
    assert result.config_same
    assert {t.status for t in result.tensors} <= {"bit-exact", "same-values"}
    c_ = result.consequence
    assert c_.ran and c_.first_part is None and c_.kl_mean == 0.0 and c_.argmax_agreement == 1.0


def test_dense_against_mxfp4_states_which_way(base):
    """Decoded experts equal the MXFP4 side's decoding; the MXFP4 side is the OCP encoding of a
    bf16 original: both pass, each saying which."""
    decoded = {t.name: t for t in diff(base["mx"], base["dequantized"], consequence=False).tensors}
    t = decoded["model.layers.0.mlp.experts.down_proj"]
    assert t.status == "same-values" and "decoding" in t.how
    encoded = diff(base["hf"], base["mx"], consequence=False)
    assert encoded.same_model
    t = {t.name: t for t in encoded.tensors}["model.layers.0.mlp.experts.gate_up_proj"]
    assert t.status == "rounding" and "OCP MXFP4 encoding of A" in t.how


def test_float32_against_its_bf16_rounding(tmp_path):
    """A float32 model whose values are not all bf16 numbers, and B = A rounded to bf16."""
    def precise():
        for name, t in iter_random_weights(TINY, seed=2, dtype=torch.float32):
            gen = torch.Generator().manual_seed(len(name))
            yield name, t * (1 + 1e-3 * torch.rand(t.shape, generator=gen))
    hf.write(precise(), TINY, tmp_path / "f32", dtype=torch.float32)
    c.rewrite(tmp_path / "f32", tmp_path / "bf16", "hf", {}, dtype=torch.bfloat16)
    result = diff(tmp_path / "f32", tmp_path / "bf16")
    assert result.same_model
    statuses = {t.status for t in result.tensors}
    assert statuses == {"rounding"}, statuses
    assert all(t.how == "B == A.to(bfloat16) exactly" for t in result.tensors)
    assert result.consequence.kl_mean < 1e-2  # the rounding's own effect, reported
    # and the other way round: A is the lower side
    back = diff(tmp_path / "bf16", tmp_path / "f32", consequence=False)
    assert back.same_model and all(t.how == "A == B.to(bfloat16) exactly" for t in back.tensors)


def test_unexplained_change_gets_statistics(base, tmp_path):
    """Noise on one tensor (a fine-tune, say) matches no transform: statistics, no diagnosis."""
    gen = torch.Generator().manual_seed(3)
    noisy = c.edit_safetensors(base["hf"], tmp_path / "b", {
        "model.layers.2.self_attn.v_proj.weight": lambda t: (t.float() + 0.05 * torch.randn(t.shape, generator=gen)).to(t.dtype)})
    result = diff(base["hf"], noisy, consequence=False)
    (t,) = result.findings
    assert t.name == "model.layers.2.self_attn.v_proj.weight" and t.diagnosis is None
    s = t.stats
    assert 0 < s.rel_l2 < 1 and s.max_abs > 0 and 0.5 < s.differing_share <= 1
    assert s.ulp_dtype == "BF16" and sum(s.ulp_histogram.values()) == 32 * 64 and s.ulp_histogram["0"] < 32 * 64


def test_missing_extra_and_config_fields_are_named(base, tmp_path):
    from safetensors.torch import load_file, save_file
    b = c.edit_safetensors(base["hf"], tmp_path / "b", {}, config={"sliding_window": 8, "rope_scaling": {
        "beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
        "rope_type": "yarn", "truncate": True}})
    file = next(b.glob("*.safetensors"))
    tensors = load_file(file)
    tensors["model.layers.1.extra.weight"] = tensors.pop("model.layers.1.self_attn.sinks")
    save_file(tensors, file, metadata={"format": "pt"})
    result = diff(base["hf"], b)
    fields = {f.field for f in result.config if not f.same}
    assert fields == {"sliding_window", "rope_truncate"}
    assert [f.field for f in result.config][:5] == ["sliding_window", "layer_types", "rope_factor", "rope_truncate",
                                                    "rope_theta"]
    status = {t.name: t.status for t in result.findings}
    assert status == {"model.layers.1.self_attn.sinks": "missing", "model.layers.1.extra.weight": "extra"}
    assert not result.same_model
    assert result.consequence.reason.startswith("stopped before layer 1")
