"""The package's configs and tensor tables against the published facts in references/.

references/ is written by scripts/make_reference_manifests.py from the published tables of docs/layouts.md alone (shapes
typed out, with the published counts and byte totals as anchors), so these tests compare two
independent sources.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from gptoss_verify.config import ModelSpec, preset
from gptoss_verify.formats import hf, openai
from gptoss_verify.formats.safetensors_io import dtype_code

REFS = Path(__file__).resolve().parents[2] / "references"
PUBLISHED = {"gpt-oss-20b": (459, 13761264768), "gpt-oss-120b": (687, 65248815744)}


def _load(name: str) -> dict:
    return json.loads((REFS / name).read_text())


def _same_spec(a: ModelSpec, b: ModelSpec) -> bool:
    return dataclasses.replace(a, name="x") == dataclasses.replace(b, name="x")


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_published_configs_give_the_presets(model):
    assert _same_spec(ModelSpec.from_hf_config(_load(f"{model}.config.json")), preset(model))
    assert _same_spec(ModelSpec.from_openai_config(_load(f"{model}.original-config.json")), preset(model))


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_exported_hf_config_keeps_the_published_fields(model):
    published = _load(f"{model}.config.json")
    ours = preset(model).to_hf_config(mxfp4=True)
    for key in ("attention_bias", "hidden_act", "sliding_window", "layer_types", "rope_scaling", "swiglu_limit",
                "quantization_config", "num_local_experts", "num_hidden_layers", "vocab_size", "head_dim",
                "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        assert ours[key] == published[key], key
    assert ours["rope_scaling"]["truncate"] is False
    assert preset(model).to_openai_config() == _load(f"{model}.original-config.json")


def _manifest(model: str, kind: str) -> dict:
    doc = _load(f"{model}.{kind}-manifest.json")
    return doc, {n: (tuple(t["shape"]), t["dtype"]) for n, t in doc["tensors"].items()}


def _ours(table) -> dict:
    return {n: (tuple(s), dtype_code(d)) for n, (s, d) in table.items()}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_hf_mxfp4_table_equals_the_published_manifest(model):
    doc, manifest = _manifest(model, "hf")
    assert (doc["count"], doc["total_size"]) == PUBLISHED[model]
    assert _ours(hf.expected_tensors(preset(model), mxfp4=True)) == manifest


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_openai_table_equals_the_published_manifest(model):
    doc, manifest = _manifest(model, "original")
    assert doc["total_size"] == PUBLISHED[model][1]  # the same bytes, q/k/v fused
    assert _ours(openai.expected_tensors(preset(model), mxfp4=True)) == manifest
