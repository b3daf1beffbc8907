"""The HF layout: make-checkpoint contents, published naming, and loading in transformers itself
with the same logits as our model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gptoss_verify.formats import hf, mxfp4
from gptoss_verify.formats.canonical import to_dense
from gptoss_verify.model import Transformer
from gptoss_verify.weights import iter_random_weights

from .conftest import SQUARE, TINY, cli


def _all_files(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_bf16_checkpoint_holds_the_generator_weights(hf_bf16):
    stored = _all_files(hf_bf16)
    expected = dict(iter_random_weights(TINY, seed=4))
    assert set(stored) == set(expected)
    for name, t in expected.items():
        assert stored[name].dtype == torch.bfloat16 and torch.equal(stored[name], t), name
    cfg = json.loads((hf_bf16 / "config.json").read_text())
    assert cfg["model_type"] == "gpt_oss" and "quantization_config" not in cfg


def test_mxfp4_checkpoint_is_sharded_as_published_and_holds_the_ocp_encoding(hf_mxfp4):
    files = sorted(p.name for p in hf_mxfp4.glob("*.safetensors"))
    n = len(files)
    assert n >= 3 and files == [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)]
    index = json.loads((hf_mxfp4 / "model.safetensors.index.json").read_text())
    last = files[-1]
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert index["weight_map"][name] == last  # as in the published index
    stored = _all_files(hf_mxfp4)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    cfg = json.loads((hf_mxfp4 / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    for name, w in iter_random_weights(TINY, seed=3):
        if name.endswith(("gate_up_proj", "down_proj")):
            # the checkpoint holds [E, out, in/32, 16]: blocks along the input dim of x @ W
            blocks, scales = mxfp4.encode(w.transpose(1, 2))
            assert stored[name + "_blocks"].shape == (w.shape[0], w.shape[2], w.shape[1] // 32, 16)
            assert torch.equal(stored[name + "_blocks"], blocks) and torch.equal(stored[name + "_scales"], scales)
            assert name not in stored
        else:
            assert torch.equal(stored[name], w), name


def test_read_streams_in_canonical_order(hf_mxfp4):
    spec, stream = hf.read(hf_mxfp4)
    names = [n for n, _ in stream]
    assert spec.num_layers == 4 and names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    assert names.index("model.layers.0.mlp.experts.gate_up_proj_blocks") + 1 == \
        names.index("model.layers.0.mlp.experts.gate_up_proj_scales")


def _from_pretrained(path, mxfp4_ckpt: bool):
    from transformers import GptOssForCausalLM, Mxfp4Config
    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    if mxfp4_ckpt:
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    try:
        return GptOssForCausalLM.from_pretrained(path, experts_implementation="eager", **kwargs).eval()
    except TypeError:  # a transformers without experts_implementation
        return GptOssForCausalLM.from_pretrained(path, **kwargs).eval()


@pytest.mark.parametrize("kind", ["bf16", "mxfp4", "mxfp4-square"])
def test_transformers_loads_it_and_gives_our_logits(kind, hf_bf16, hf_mxfp4, tmp_path):
    if kind == "bf16":
        path, spec = hf_bf16, TINY
    elif kind == "mxfp4":
        path, spec = hf_mxfp4, TINY
    else:
        path, spec = tmp_path / "sq", SQUARE
        config = tmp_path / "square.json"
        config.write_text(json.dumps(SQUARE.to_hf_config()))
        assert cli("make-checkpoint", path, "--config", config, "--mxfp4", "--seed", 5) == 0
    model = _from_pretrained(path, kind != "bf16")
    read_spec, stream = hf.read(path)
    state = {n: t.float() for n, t in to_dense(stream)}
    ours = Transformer.from_state_dict(read_spec, state)
    assert read_spec.intermediate_size == spec.intermediate_size
    theirs = model.state_dict()
    assert set(theirs) == set(state)
    for name, t in state.items():  # transformers decoded the MXFP4 experts to what we decode
        assert torch.equal(theirs[name], t), name
    ids = torch.randint(0, spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids), model(input_ids=ids).logits
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(a.abs().max()))
