"""The OpenAI original layout: names and fusion as published, byte-identical MXFP4 round trip with
HF, and loading the way OpenAI's `gpt_oss/torch/weights.py` loads (written out here), plus, when a
copy of openai/gpt-oss is at hand, with OpenAI's own `Transformer.from_checkpoint`."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gptoss_verify.formats import hf
from gptoss_verify.formats.canonical import to_dense
from gptoss_verify.model import Transformer

from .conftest import TINY, cli, tree_hashes


@pytest.fixture(scope="module")
def openai_ckpt(hf_mxfp4, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("oa") / "openai"
    assert cli("convert", hf_mxfp4, out, "--to", "openai") == 0
    return out


def test_hf_mxfp4_to_openai_to_hf_is_byte_identical(tmp_path):
    src = tmp_path / "hf"
    assert cli("make-checkpoint", src, "--mxfp4", "--seed", 7) == 0
    before = tree_hashes(src)
    assert cli("convert", src, tmp_path / "oa", "--to", "openai") == 0
    assert cli("convert", tmp_path / "oa", tmp_path / "back", "--to", "hf") == 0
    assert tree_hashes(tmp_path / "back") == before  # every file, byte for byte
    assert tree_hashes(src) == before


def _stored(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_names_fusion_and_bytes_as_published(openai_ckpt, hf_mxfp4):
    """docs/layouts.md §4, written out: qkv rows q then k then v; mlp1/mlp2 blocks and scales are HF's bytes."""
    o, h = _stored(openai_ckpt), _stored(hf_mxfp4)
    assert json.loads((openai_ckpt / "config.json").read_text()) == TINY.to_openai_config()
    dtypes = json.loads((openai_ckpt / "dtypes.json").read_text())
    assert set(dtypes) == set(o) and dtypes["block.0.mlp.mlp1_weight.blocks"] == "FP4" \
        and dtypes["block.0.mlp.mlp1_weight.scales"] == "UE8" and dtypes["block.0.attn.qkv.weight"] == "BF16"
    assert len(o) == 3 + 15 * TINY.num_layers
    assert torch.equal(o["embedding.weight"], h["model.embed_tokens.weight"])
    assert torch.equal(o["unembedding.weight"], h["lm_head.weight"])
    assert torch.equal(o["norm.scale"], h["model.norm.weight"])
    for n in range(TINY.num_layers):
        b, m = f"block.{n}.", f"model.layers.{n}."
        for kind in ("weight", "bias"):
            q, k, v = (h[f"{m}self_attn.{p}_proj.{kind}"] for p in "qkv")
            qkv = o[f"{b}attn.qkv.{kind}"]
            assert qkv.shape[0] == 8 * 16 + 2 * 2 * 16
            assert torch.equal(qkv[:128], q) and torch.equal(qkv[128:160], k) and torch.equal(qkv[160:], v)
        pairs = {"attn.norm.scale": "input_layernorm.weight", "attn.sinks": "self_attn.sinks",
                 "attn.out.weight": "self_attn.o_proj.weight", "attn.out.bias": "self_attn.o_proj.bias",
                 "mlp.norm.scale": "post_attention_layernorm.weight", "mlp.gate.weight": "mlp.router.weight",
                 "mlp.gate.bias": "mlp.router.bias",
                 "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
                 "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
                 "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
                 "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
                 "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
                 "mlp.mlp2_bias": "mlp.experts.down_proj_bias"}
        for ours, theirs in pairs.items():
            assert o[b + ours].dtype == h[m + theirs].dtype and torch.equal(o[b + ours], h[m + theirs]), b + ours


# ---- OpenAI's loader, as gpt_oss/torch/weights.py does it (written out, not imported) -------------
FP4_VALUES = [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
PARAM_NAME_MAP = {f"block.{n}.mlp.mlp1_weight": (f"block.{n}.mlp.mlp1_weight.blocks", f"block.{n}.mlp.mlp1_weight.scales")
                  for n in range(36)} | {
                  f"block.{n}.mlp.mlp2_weight": (f"block.{n}.mlp.mlp2_weight.blocks", f"block.{n}.mlp.mlp2_weight.scales")
                  for n in range(36)}


def _openai_style_get(path: Path, name: str) -> torch.Tensor:
    files = {}
    for fname in os.listdir(path):
        if fname.endswith(".safetensors"):
            with safe_open(str(path / fname), framework="pt", device="cpu") as f:
                files.update({k: path / fname for k in f.keys()})

    def get_tensor(n):
        assert n in files, f"Tensor {n} not found in checkpoint."
        with safe_open(str(files[n]), framework="pt", device="cpu") as f:
            return f.get_tensor(n)
    mapped = PARAM_NAME_MAP.get(name, name)
    if isinstance(mapped, str):
        return get_tensor(mapped)
    blocks, scales = get_tensor(mapped[0]), get_tensor(mapped[1]).to(torch.int32) - 127
    assert blocks.shape[:-1] == scales.shape
    lut = torch.tensor(FP4_VALUES, dtype=torch.bfloat16)
    *prefix, g, b = blocks.shape
    rows = math.prod(prefix) * g
    blocks, scales = blocks.reshape(rows, b), scales.reshape(rows, 1)
    out = torch.empty(rows, b * 2, dtype=torch.bfloat16)
    out[:, 0::2] = lut[(blocks & 0x0F).long()]
    out[:, 1::2] = lut[(blocks >> 4).long()]
    torch.ldexp(out, scales, out=out)
    return out.reshape(*prefix, g, b * 2).view(*prefix, g * b * 2)


def test_loads_the_way_openai_loads(openai_ckpt, hf_mxfp4):
    """Every parameter OpenAI's Transformer asks for, got as its Checkpoint.get does, equals what
    our dense HF weights imply: mlp1_weight [E, 2I, H] = gate_up_proj [E, H, 2I] transposed."""
    _, stream = hf.read(hf_mxfp4)
    dense = dict(to_dense(stream))
    cfg = json.loads((openai_ckpt / "config.json").read_text())
    assert cfg["initial_context_length"] == 4096  # OpenAI's RotaryEmbedding asserts the YaRN range
    for n in range(cfg["num_hidden_layers"]):
        m = f"model.layers.{n}."
        mlp1 = _openai_style_get(openai_ckpt, f"block.{n}.mlp.mlp1_weight")
        assert torch.equal(mlp1, dense[m + "mlp.experts.gate_up_proj"].transpose(1, 2))
        mlp2 = _openai_style_get(openai_ckpt, f"block.{n}.mlp.mlp2_weight")
        assert torch.equal(mlp2, dense[m + "mlp.experts.down_proj"].transpose(1, 2))
        qkv = _openai_style_get(openai_ckpt, f"block.{n}.attn.qkv.weight")
        assert torch.equal(qkv, torch.cat([dense[m + f"self_attn.{p}_proj.weight"] for p in "qkv"]))
    assert torch.equal(_openai_style_get(openai_ckpt, "unembedding.weight"), dense["lm_head.weight"])


# ---- OpenAI's own code, when a copy is available (never a dependency of the package) --------------
def _openai_source(tmp_path: Path) -> Path | None:
    """A directory holding gpt_oss/torch/{model,weights}.py: $GPTOSS_OPENAI_REPO (a checkout or a
    bare git dir of openai/gpt-oss), or the mirror this project's sessions fetch it to."""
    candidates = [os.environ.get("GPTOSS_OPENAI_REPO"), "/work/.mirror/openai+gpt-oss/repo"]
    for c in filter(None, candidates):
        c = Path(c)
        if (c / "gpt_oss" / "torch" / "model.py").exists():
            return c
        if (c / "HEAD").exists():
            out = tmp_path / "gpt_oss_src"
            (out / "gpt_oss" / "torch").mkdir(parents=True)
            for rel in ("gpt_oss/__init__.py", "gpt_oss/torch/__init__.py", "gpt_oss/torch/model.py",
                        "gpt_oss/torch/weights.py"):
                text = subprocess.run(["git", f"--git-dir={c}", "show", f"HEAD:{rel}"], capture_output=True,
                                      text=True)
                if text.returncode:
                    return None
                (out / rel).write_text(text.stdout)
            return out
    return None


def test_openai_reference_loads_it_and_agrees(openai_ckpt, hf_mxfp4, tmp_path, monkeypatch):
    src = _openai_source(tmp_path)
    if src is None:
        pytest.skip("no copy of openai/gpt-oss (set GPTOSS_OPENAI_REPO to a checkout)")
    monkeypatch.syspath_prepend(str(src))
    for mod in [m for m in sys.modules if m == "gpt_oss" or m.startswith("gpt_oss.")]:
        monkeypatch.delitem(sys.modules, mod)
    from gpt_oss.torch.model import Transformer as OpenAITransformer
    theirs = OpenAITransformer.from_checkpoint(str(openai_ckpt), device="cpu")
    _, stream = hf.read(hf_mxfp4)
    dense = dict(to_dense(stream))
    params = dict(theirs.named_parameters())
    assert torch.equal(params["block.1.mlp.mlp1_weight"], dense["model.layers.1.mlp.experts.gate_up_proj"].transpose(1, 2))
    assert torch.equal(params["block.1.attn.qkv.bias"],
                       torch.cat([dense[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"]))
    # logits: OpenAI's model runs in bf16; judge it against our float32 model on the same weights,
    # by the rule of flash-attention's tests: its error at most 2x our own bf16 error (+ a floor)
    ids = torch.randint(0, TINY.vocab_size, (24,), generator=torch.Generator().manual_seed(2))
    truth_model = Transformer.from_state_dict(TINY, {k: v.float() for k, v in dense.items()})
    ours_bf16 = Transformer.from_state_dict(TINY, dense)
    with torch.no_grad():
        truth = truth_model(ids[None])[0]
        mine = ours_bf16(ids[None])[0].float()
        openai_logits = theirs(ids).float()
    err_openai = float((openai_logits - truth).abs().max())
    err_ours = float((mine - truth).abs().max())
    print(f"max |logit error| vs float32: OpenAI bf16 {err_openai:.4g}, ours bf16 {err_ours:.4g}, "
          f"max |logit| {float(truth.abs().max()):.4g}")
    assert err_openai <= 2 * err_ours + 2 ** -7 * float(truth.abs().max()), (err_openai, err_ours)
