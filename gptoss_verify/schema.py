"""The canonical tensors of a GPT-OSS model: names, shapes, expert orientation, MXFP4 shapes.

Every layout reads and writes this one schema (HF names, the HF module layout), the random-weight
generator draws it, and the Megatron mapping table (`formats/megatron/mapping.py`) is written
against it. Expert weights are stored dense in the module's `x @ W` orientation, [E, in, out]
(`gate_up_proj` [E, H, 2I] with gate and up interleaved on the last axis, `down_proj` [E, I, H]);
checkpoints (MXFP4 or OpenAI) and Megatron hold them [E, out, in].
"""
from __future__ import annotations

import math

from .config import ModelSpec
from .formats.errors import CheckpointError

#: The tensors of one decoder layer, in checkpoint order, named under `model.layers.{i}.`.
LAYER_TENSORS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.o_proj.weight", "self_attn.o_proj.bias",
    "self_attn.sinks",
    "post_attention_layernorm.weight",
    "mlp.router.weight", "mlp.router.bias",
    "mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias",
    "mlp.experts.down_proj", "mlp.experts.down_proj_bias",
)
FIRST_TENSORS = ("model.embed_tokens.weight",)
LAST_TENSORS = ("model.norm.weight", "lm_head.weight")
#: The dense expert weights (each [E, in, out]); in MXFP4 form each is a `_blocks`/`_scales` pair.
EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
#: Values per MXFP4 block, sharing one E8M0 scale (OCP MX).
MXFP4_BLOCK = 32


def layer_name(layer: int, name: str) -> str:
    """The full canonical name of a layer tensor (`name` as in LAYER_TENSORS)."""
    return f"model.layers.{layer}.{name}"


def split_layer_name(name: str) -> tuple[int, str] | None:
    """(layer, name within the layer) of a layer tensor's full name, None for the others."""
    if not name.startswith("model.layers."):
        return None
    _, _, layer, rest = name.split(".", 3)
    return int(layer), rest


def canonical_names(spec: ModelSpec) -> list[str]:
    """Every tensor name of the dense canonical state dict, in checkpoint order."""
    names = list(FIRST_TENSORS)
    for i in range(spec.num_layers):
        names += [layer_name(i, n) for n in LAYER_TENSORS]
    return names + list(LAST_TENSORS)


def layer_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The dense canonical shape of every layer tensor (HF module layout, experts as x @ W)."""
    h, d, e, inter = spec.hidden_size, spec.head_dim, spec.num_experts, spec.intermediate_size
    nq, nkv = spec.num_heads * d, spec.num_kv_heads * d
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (nq, h), "self_attn.q_proj.bias": (nq,),
        "self_attn.k_proj.weight": (nkv, h), "self_attn.k_proj.bias": (nkv,),
        "self_attn.v_proj.weight": (nkv, h), "self_attn.v_proj.bias": (nkv,),
        "self_attn.o_proj.weight": (h, nq), "self_attn.o_proj.bias": (h,),
        "self_attn.sinks": (spec.num_heads,),
        "post_attention_layernorm.weight": (h,),
        "mlp.router.weight": (e, h), "mlp.router.bias": (e,),
        "mlp.experts.gate_up_proj": (e, h, 2 * inter), "mlp.experts.gate_up_proj_bias": (e, 2 * inter),
        "mlp.experts.down_proj": (e, inter, h), "mlp.experts.down_proj_bias": (e, h),
    }


def outer_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors outside the layers (FIRST_TENSORS, LAST_TENSORS)."""
    return {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size),
            "model.norm.weight": (spec.hidden_size,), "lm_head.weight": (spec.vocab_size, spec.hidden_size)}


def parameter_count(spec: ModelSpec) -> int:
    """The model's parameters, from the shapes in closed form (no loop over layers): what readers
    bound a config read from a file by (formats/plausible.py)."""
    per_layer = sum(math.prod(s) for s in layer_shapes(spec).values())
    return spec.num_layers * per_layer + sum(math.prod(s) for s in outer_shapes(spec).values())


def canonical_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The dense canonical shape of every tensor, in checkpoint order."""
    per_layer, outer = layer_shapes(spec), outer_shapes(spec)
    shapes = {n: outer[n] for n in FIRST_TENSORS}
    for i in range(spec.num_layers):
        shapes.update({layer_name(i, n): per_layer[n] for n in LAYER_TENSORS})
    shapes.update({n: outer[n] for n in LAST_TENSORS})
    return shapes


def is_expert_weight(name: str) -> bool:
    return name.endswith(EXPERT_WEIGHTS)


def expert_in_out(spec: ModelSpec, dense_name: str) -> tuple[int, int]:
    """(inputs, outputs) of one expert of a dense expert weight: gate_up_proj (H, 2I), down_proj (I, H)."""
    h, inter = spec.hidden_size, spec.intermediate_size
    return (h, 2 * inter) if dense_name.endswith("gate_up_proj") else (inter, h)


def mxfp4_shapes(spec: ModelSpec, dense_name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Checkpoint shapes (blocks, scales) of one dense expert weight: rows = outputs, blocks of
    32 along the inputs, two 4-bit values per byte."""
    inp, out = expert_in_out(spec, dense_name)
    if inp % MXFP4_BLOCK:
        raise CheckpointError(f"{dense_name}: MXFP4 needs an input width that is a multiple of "
                              f"{MXFP4_BLOCK}, got {inp}")
    e = spec.num_experts
    return (e, out, inp // MXFP4_BLOCK, MXFP4_BLOCK // 2), (e, out, inp // MXFP4_BLOCK)
