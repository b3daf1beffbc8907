"""megatron-core's `GPTModel` built as GPT-OSS (local layer spec: TransformerEngine is not installable
here), and our files loaded into it the way Megatron-LM loads them.

The settings are those of Megatron-Bridge's GPT-OSS bridge, but for two: the allgather token
dispatcher and `SequentialMLP` (they run on the CPU), and `bias_activation_fusion=False`. With
`bias_activation_fusion=True` (the bridge's setting) the local `SequentialMLP` builds fc1 with
`skip_bias_add=True`, and the fused GLU then clamps *before* adding the fc1 bias
(`fusions/fused_bias_geglu.py`), which is not GPT-OSS; `Variant(bias_activation_fusion=True)`
builds it that way on purpose, as a negative control.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ...config import ModelSpec
from ...formats.megatron import mapping


@dataclasses.dataclass(frozen=True)
class Variant:
    """Deliberate departures from the GPT-OSS settings (negative controls); the default is none."""
    window_minus: int = 1                 # window_size = (W - window_minus, 0); GPT-OSS is W - 1
    bias_activation_fusion: bool = False  # Megatron-Bridge's setting; clamps before the bias on this path


def _activation(alpha: float):
    """GPT-OSS's GLU activation `y · sigmoid(alpha · y)`: megatron-core's `quick_gelu` for its
    alpha 1.702 (the fused path accepts only that function), our own for any other alpha."""
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    if alpha == 1.702:
        return quick_gelu

    def act(y: torch.Tensor) -> torch.Tensor:
        return y * torch.sigmoid(alpha * y)
    return act


def transformer_config(spec: ModelSpec, dtype: torch.dtype, tp: int, ep: int, variant: Variant = Variant()):
    """megatron-core's TransformerConfig for GPT-OSS: sinks as a learnable softmax offset, a window
    of (W-1, 0) on every other layer (the first one sliding), YaRN, the clamped GLU with offset 1
    and alpha, biases everywhere, top-k then softmax routing with a router bias."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    cfg = TransformerConfig(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads, kv_channels=spec.head_dim, ffn_hidden_size=spec.intermediate_size,
        moe_ffn_hidden_size=spec.intermediate_size, num_moe_experts=spec.num_experts,
        moe_router_topk=spec.experts_per_token, moe_router_pre_softmax=False,
        moe_router_load_balancing_type="none", moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
        normalization="RMSNorm", layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True, activation_func=_activation(spec.swiglu_alpha),
        activation_func_clamp_value=spec.swiglu_limit, glu_linear_offset=1.0,
        bias_activation_fusion=variant.bias_activation_fusion, add_bias_linear=True, add_qkv_bias=True,
        softmax_type="learnable", window_size=(spec.sliding_window - variant.window_minus, 0),
        window_attn_skip_freq=2,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, perform_initialization=False,
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=1,
        sequence_parallel=False,
    )
    # GPTModel reads the YaRN settings from the config by name (as Megatron-Bridge sets them)
    cfg.yarn_rotary_scaling_factor = spec.rope_factor
    cfg.yarn_original_max_position_embeddings = spec.rope_original_max_position
    cfg.yarn_beta_fast, cfg.yarn_beta_slow = spec.rope_beta_fast, spec.rope_beta_slow
    cfg.yarn_mscale = cfg.yarn_mscale_all_dim = None
    cfg.yarn_correction_range_round_to_int = spec.rope_truncate
    return cfg


def build_model(spec: ModelSpec, dtype: torch.dtype, padded_vocab: int, tp: int, ep: int,
                variant: Variant = Variant()):
    """megatron-core's GPTModel for `spec` on this rank (parallel_state must be initialised)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    cfg = transformer_config(spec, dtype, tp, ep, variant)
    layer_spec = get_gpt_layer_local_spec(num_experts=spec.num_experts, moe_grouped_gemm=False,
                                          normalization="RMSNorm")
    model = GPTModel(config=cfg, transformer_layer_spec=layer_spec, vocab_size=padded_vocab,
                     max_sequence_length=spec.max_position_embeddings, pre_process=True, post_process=True,
                     parallel_output=False, share_embeddings_and_output_weights=False,
                     position_embedding_type="yarn", rotary_base=spec.rope_theta)
    return model.eval()


def cast_like_float16_module(model, dtype: torch.dtype) -> dict[str, str]:
    """The whole model in `dtype`, as Megatron-LM's `Float16Module` casts it for bf16
    (`module.bfloat16()`, transformer/module.py): the local spec's RMSNorm is `torch.nn.RMSNorm`
    built without a dtype (transformer/torch_norm.py, `WrappedTorchNorm`), so its weights are
    float32 whatever `params_dtype`. Returns {parameter: its dtype before} for those cast."""
    before = {n: str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if p.dtype != dtype}
    model.to(dtype)
    return before


# ---- loading ------------------------------------------------------------------------------------
def load_legacy(model, rank_file: str | Path, fault: str | None = None) -> None:
    """This rank's file as Megatron-LM reads it (plain `torch.load`, weights only), in the local
    spec's names (`mapping.respell`; a no-op for files written with local names), into the model
    with `load_state_dict(strict=True)`. `fault`: a key of `WEIGHT_FAULTS`."""
    raw = torch.load(rank_file, map_location="cpu", weights_only=True)["model"]
    state = {mapping.respell(mapping.normalise(n) or n, mapping.LOCAL): t for n, t in raw.items()}
    if fault is not None:
        state = WEIGHT_FAULTS[fault](state, model.config)
    model.load_state_dict(state, strict=True)


def load_torch_dist(model, checkpoint_dir: str | Path) -> None:
    """A torch_dist directory through megatron-core's own `dist_checkpointing.load` with its
    default strictness, the model's entries under "model" as Megatron-LM nests them, then
    `load_state_dict(strict=True)`."""
    from megatron.core import dist_checkpointing
    iter_dir = next(p for p in sorted(Path(checkpoint_dir).glob("iter_*")) if p.is_dir())
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(iter_dir))
    model.load_state_dict(state["model"], strict=True)


# ---- negative controls, applied between the file and load_state_dict ----------------------------
def _fc1_interleaved(state, cfg):
    """fc1 rows left as HF interleaves them (gate, up, gate, up, ...) instead of [gate; up]."""
    return {n: mapping.interleave(t) if mapping.is_row(n, ("fc1_weight", "fc1_bias"), mapping.LOCAL) else t
            for n, t in state.items()}


def _qkv_ungrouped(state, cfg):
    """The fused QKV rows as [all q; all k; all v] instead of grouped by KV head."""
    out = dict(state)
    qpk, d = cfg.num_attention_heads // cfg.num_query_groups, cfg.kv_channels
    for n, t in state.items():
        if mapping.is_row(n, ("qkv_weight", "qkv_bias"), mapping.LOCAL):
            out[n] = torch.cat(mapping.ungroup_qkv(t, qpk, d))
    return out


def _router_bias_dropped(state, cfg):
    """The router bias lost (zeros) on the way in."""
    return {n: torch.zeros_like(t) if mapping.is_row(n, ("router_bias",), mapping.LOCAL) else t
            for n, t in state.items()}


WEIGHT_FAULTS = {"fc1-interleaved": _fc1_interleaved, "qkv-ungrouped": _qkv_ungrouped,
                 "router-bias-dropped": _router_bias_dropped}
