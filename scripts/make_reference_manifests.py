"""Write references/*.json: the published configs and tensor manifests of gpt-oss-20b and -120b.

Written from the published facts alone (docs/layouts.md §1, docs/layouts.md §2, docs/layouts.md §4; research/gptoss-numerics.md §2), with
the shapes typed out here, not computed by the package, so that the tests comparing the package's
tables with these files compare two independent sources. Anchors checked on write: 459 tensors and
13761264768 bytes (20B HF), 687 and 65248815744 (120B), as the published index files say.

Run: python scripts/make_reference_manifests.py  (rewrites references/)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "references"
MODELS = {"gpt-oss-20b": {"layers": 24, "experts": 32}, "gpt-oss-120b": {"layers": 36, "experts": 128}}
ANCHORS = {("gpt-oss-20b", "hf"): (459, 13761264768), ("gpt-oss-120b", "hf"): (687, 65248815744)}
V, H = 201088, 2880  # vocab, hidden (= intermediate)


def hf_config(layers: int, experts: int) -> dict:
    """The published config.json (docs/layouts.md §1), keys as published."""
    return {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
        "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
        "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
        "num_experts_per_tok": 4, "num_hidden_layers": layers, "num_key_value_heads": 8,
        "num_local_experts": experts, "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"],
                                "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True,
        "vocab_size": 201088,
    }


def original_config(layers: int, experts: int) -> dict:
    """The published original/config.json (docs/layouts.md §1)."""
    return {"num_hidden_layers": layers, "num_experts": experts, "experts_per_token": 4, "vocab_size": 201088,
            "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
            "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
            "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
            "rope_ntk_alpha": 1, "rope_ntk_beta": 32}


def hf_manifest(layers: int, E: int) -> dict:
    """docs/layouts.md §2 table, row by row."""
    t = {"model.embed_tokens.weight": ([201088, 2880], "BF16")}
    for n in range(layers):
        p = f"model.layers.{n}."
        t.update({
            p + "input_layernorm.weight": ([2880], "BF16"),
            p + "post_attention_layernorm.weight": ([2880], "BF16"),
            p + "self_attn.q_proj.weight": ([4096, 2880], "BF16"), p + "self_attn.q_proj.bias": ([4096], "BF16"),
            p + "self_attn.k_proj.weight": ([512, 2880], "BF16"), p + "self_attn.k_proj.bias": ([512], "BF16"),
            p + "self_attn.v_proj.weight": ([512, 2880], "BF16"), p + "self_attn.v_proj.bias": ([512], "BF16"),
            p + "self_attn.o_proj.weight": ([2880, 4096], "BF16"), p + "self_attn.o_proj.bias": ([2880], "BF16"),
            p + "self_attn.sinks": ([64], "BF16"),
            p + "mlp.router.weight": ([E, 2880], "BF16"), p + "mlp.router.bias": ([E], "BF16"),
            p + "mlp.experts.gate_up_proj_blocks": ([E, 5760, 90, 16], "U8"),
            p + "mlp.experts.gate_up_proj_scales": ([E, 5760, 90], "U8"),
            p + "mlp.experts.gate_up_proj_bias": ([E, 5760], "BF16"),
            p + "mlp.experts.down_proj_blocks": ([E, 2880, 90, 16], "U8"),
            p + "mlp.experts.down_proj_scales": ([E, 2880, 90], "U8"),
            p + "mlp.experts.down_proj_bias": ([E, 2880], "BF16"),
        })
    t.update({"model.norm.weight": ([2880], "BF16"), "lm_head.weight": ([201088, 2880], "BF16")})
    return t


def original_manifest(layers: int, E: int) -> dict:
    """docs/layouts.md §4 and original/dtypes.json (research §3.2): qkv fused to 64·(64+2·8) = 5120 rows."""
    t = {"embedding.weight": ([201088, 2880], "BF16")}
    for n in range(layers):
        p = f"block.{n}."
        t.update({
            p + "attn.norm.scale": ([2880], "BF16"),
            p + "attn.qkv.weight": ([5120, 2880], "BF16"), p + "attn.qkv.bias": ([5120], "BF16"),
            p + "attn.sinks": ([64], "BF16"),
            p + "attn.out.weight": ([2880, 4096], "BF16"), p + "attn.out.bias": ([2880], "BF16"),
            p + "mlp.norm.scale": ([2880], "BF16"),
            p + "mlp.gate.weight": ([E, 2880], "BF16"), p + "mlp.gate.bias": ([E], "BF16"),
            p + "mlp.mlp1_weight.blocks": ([E, 5760, 90, 16], "U8"),
            p + "mlp.mlp1_weight.scales": ([E, 5760, 90], "U8"),
            p + "mlp.mlp1_bias": ([E, 5760], "BF16"),
            p + "mlp.mlp2_weight.blocks": ([E, 2880, 90, 16], "U8"),
            p + "mlp.mlp2_weight.scales": ([E, 2880, 90], "U8"),
            p + "mlp.mlp2_bias": ([E, 2880], "BF16"),
        })
    t.update({"norm.scale": ([2880], "BF16"), "unembedding.weight": ([201088, 2880], "BF16")})
    return t


def total_bytes(manifest: dict) -> int:
    size = {"BF16": 2, "U8": 1}
    return sum(math.prod(shape) * size[dt] for shape, dt in manifest.values())


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for model, m in MODELS.items():
        (OUT / f"{model}.config.json").write_text(json.dumps(hf_config(m["layers"], m["experts"]), indent=2) + "\n")
        (OUT / f"{model}.original-config.json").write_text(
            json.dumps(original_config(m["layers"], m["experts"]), indent=2) + "\n")
        for kind, build in (("hf", hf_manifest), ("original", original_manifest)):
            tensors = build(m["layers"], m["experts"])
            total = total_bytes(tensors)
            anchor = ANCHORS.get((model, kind))
            if anchor and anchor != (len(tensors), total):
                raise SystemExit(f"{model} {kind}: {len(tensors)} tensors / {total} bytes, published {anchor}")
            doc = {"model": model, "layout": kind, "source": "docs/layouts.md §2, docs/layouts.md §4 (published index and dtypes.json)",
                   "count": len(tensors), "total_size": total,
                   "tensors": {k: {"shape": s, "dtype": d} for k, (s, d) in tensors.items()}}
            (OUT / f"{model}.{kind}-manifest.json").write_text(json.dumps(doc, indent=1) + "\n")
            print(f"{model} {kind}: {len(tensors)} tensors, {total} bytes")


if __name__ == "__main__":
    main()
