"""ModelSpec: presets, config round trips, validation that names the bad field."""
from __future__ import annotations

import pytest

from gptoss_verify.config import PRESETS, ConfigError, ModelSpec, preset


def test_tiny_preset_has_every_feature():
    s = preset("tiny")
    assert s.num_heads // s.num_kv_heads > 1
    assert s.experts_per_token < s.num_experts
    assert s.sliding_window < 40  # the default parity sequence
    assert s.head_dim >= 16
    assert s.hidden_size != s.intermediate_size
    assert s.hidden_size % 32 == 0 and s.intermediate_size % 32 == 0


def test_published_shapes():
    s20, s120 = preset("gpt-oss-20b"), preset("gpt-oss-120b")
    assert (s20.num_layers, s20.num_experts, s120.num_layers, s120.num_experts) == (24, 32, 36, 128)
    assert s20.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert s20.layer_types.count("sliding_attention") == 12
    assert abs(s20.concentration - 1.3465735902799727) < 1e-15


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_and_openai_config_round_trip(name):
    spec = preset(name)
    assert ModelSpec.from_hf_config(spec.to_hf_config(), name=name) == spec
    assert ModelSpec.from_openai_config(spec.to_openai_config(), name=name) == spec
    assert ModelSpec.from_json(spec.to_json()) == spec


def test_missing_truncate_reads_as_transformers_reads_it():
    cfg = preset("gpt-oss-20b").to_hf_config()
    del cfg["rope_scaling"]["truncate"]
    assert ModelSpec.from_hf_config(cfg).rope_truncate is True


@pytest.mark.parametrize("field,value,message", [
    ("num_kv_heads", 3, "num_heads"),
    ("head_dim", 15, "head_dim"),
    ("experts_per_token", 9, "experts_per_token"),
    ("hidden_size", 0, "hidden_size"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps"),
    ("rope_factor", 0.5, "rope_factor"),
])
def test_validation_names_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        preset("tiny").replace(**{field: value})


def test_layer_types_must_alternate():
    cfg = preset("tiny").to_hf_config()
    cfg["layer_types"] = ["full_attention"] * 4
    with pytest.raises(ConfigError, match="layer_types"):
        ModelSpec.from_hf_config(cfg)


def test_missing_field_is_named():
    cfg = preset("tiny").to_openai_config()
    del cfg["num_experts"]
    with pytest.raises(ConfigError, match="num_experts"):
        ModelSpec.from_openai_config(cfg)
