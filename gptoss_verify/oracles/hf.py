"""The transformers oracle: `GptOssForCausalLM` built from a `ModelSpec` and a canonical state dict,
pinned (docs/numerics.md §9) and recording the same `Trace` as our model through hooks.

Pinning: eager attention, the eager per-expert loop (`grouped_mm` rejects float64), no hub
kernels, TF32 off, dense (dequantized) experts. The only deviation from stock transformers is for
float64 runs: its RMSNorm upcasts to float32, a precision floor rather than a semantic, so in float64
the norm is computed in float64 (`_widen_norms`); in every other dtype the oracle is untouched.

This is the only module of the package that imports transformers.
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import transformers
from transformers import GptOssConfig, GptOssForCausalLM
from transformers.models.gpt_oss import modeling_gpt_oss

from ..config import ModelSpec
from ..trace import Trace, layer_name

TRANSFORMERS_VERSION = transformers.__version__


def hf_config(spec: ModelSpec, experts_implementation: str = "eager") -> GptOssConfig:
    """The config transformers would read from our exported `config.json`, pinned to eager paths."""
    cfg = GptOssConfig.from_dict(spec.to_hf_config())
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = experts_implementation
    cfg.use_cache = False
    # transformers <= 5.17 hard-codes alpha 1.702 / limit 7 (docs/numerics.md §6): refuse a spec it would ignore.
    if not hasattr(cfg, "swiglu_alpha") and spec.swiglu_alpha != 1.702:
        raise ValueError(f"transformers {TRANSFORMERS_VERSION} ignores swiglu_alpha={spec.swiglu_alpha}")
    return cfg


class HFOracle:
    """transformers' GptOssForCausalLM on the given weights (shared, not copied)."""

    def __init__(self, spec: ModelSpec, state: dict[str, torch.Tensor], experts_implementation: str = "eager"):
        self.spec = spec
        config = hf_config(spec, experts_implementation)
        first = next(iter(state.values()))
        with torch.device("meta"):
            model = GptOssForCausalLM(config)
        model.load_state_dict(state, strict=True, assign=True)
        # buffers built on meta (rotary inv_freq) are rebuilt on the weights' device
        model.model.rotary_emb = modeling_gpt_oss.GptOssRotaryEmbedding(config).to(first.device)
        model.eval()
        self.model = model
        self.dtype = first.dtype
        if self.dtype == torch.float64:
            _widen_norms(model)

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, trace: Trace | None = None) -> torch.Tensor:
        """Logits [B, S, V] for tokens at absolute positions start_pos.. (no cache)."""
        b, s = input_ids.shape
        positions = torch.arange(start_pos, start_pos + s, device=input_ids.device).expand(b, s)
        with _pinned_numerics(), _recording(self.model, trace):
            out = self.model(input_ids=input_ids, position_ids=positions, use_cache=False)
        return out.logits

    __call__ = forward


def _widen_norms(model: GptOssForCausalLM) -> None:
    """In float64, compute RMSNorm in float64 (stock transformers caps it at float32)."""
    def forward(self, hidden_states):
        wide = hidden_states.to(torch.float64)
        variance = wide.pow(2).mean(-1, keepdim=True)
        return (self.weight * (wide * torch.rsqrt(variance + self.variance_epsilon))).to(hidden_states.dtype)

    for module in model.modules():
        if isinstance(module, modeling_gpt_oss.GptOssRMSNorm):
            module.forward = types.MethodType(forward, module)


@contextlib.contextmanager
def _pinned_numerics() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def _recording(model: GptOssForCausalLM, trace: Trace | None) -> Iterator[None]:
    """Hooks that fill `trace` with our names and layouts; removed on exit."""
    if trace is None:
        yield
        return
    handles = []
    backbone = model.model

    def on_output(name, convert=lambda t: t):
        def hook(module, args, output):
            trace.record(name, convert(output[0] if isinstance(output, tuple) else output))
        return hook

    def on_input(name):
        def hook(module, args, kwargs):
            trace.record(name, args[0] if args else kwargs["hidden_states"])
        return hook

    handles.append(backbone.embed_tokens.register_forward_hook(on_output("embed")))
    for i, layer in enumerate(backbone.layers):
        name = lambda point, i=i: layer_name(i, point)  # noqa: E731
        handles.append(layer.register_forward_pre_hook(on_input(name("input")), with_kwargs=True))
        handles.append(layer.input_layernorm.register_forward_hook(on_output(name("attn_norm"))))
        handles.append(layer.self_attn.o_proj.register_forward_hook(on_output(name("attn_out"))))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            on_input(name("resid_attn")), with_kwargs=True))
        handles.append(layer.post_attention_layernorm.register_forward_hook(on_output(name("mlp_norm"))))
        handles.append(layer.mlp.router.register_forward_hook(_router_hook(trace, i)))
        handles.append(layer.mlp.register_forward_hook(on_output(name("mlp_out"))))
        handles.append(layer.register_forward_hook(on_output(name("resid_mlp"))))
    handles.append(backbone.norm.register_forward_hook(on_output("final_norm")))
    handles.append(model.lm_head.register_forward_hook(on_output("logits")))

    original = modeling_gpt_oss.eager_attention_forward

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        """transformers' own eager attention, with its inputs (after RoPE) and output recorded."""
        i = module.layer_idx
        for point, t in (("q", query), ("k", key), ("v", value)):
            trace.record(layer_name(i, point), t.transpose(1, 2))  # [B, H, S, D] -> [B, S, H, D]
        out, weights = original(module, query, key, value, attention_mask, **kwargs)
        trace.record(layer_name(i, "attn_core"), out.reshape(*out.shape[:2], -1))
        return out, weights

    modeling_gpt_oss.eager_attention_forward = recording_attention
    try:
        yield
    finally:
        modeling_gpt_oss.eager_attention_forward = original
        for h in handles:
            h.remove()


def _router_hook(trace: Trace, layer: int):
    """The router returns (logits, scores, indices) in 5.23; older 5.x return (scores, indices)."""
    def hook(module, args, output):
        h = args[0]
        if len(output) == 3:
            logits, weights, idx = output
        else:
            weights, idx = output
            logits = torch.nn.functional.linear(h, module.weight, module.bias)
        if weights.shape[-1] != idx.shape[-1]:  # dense [T, E] scores: keep the chosen ones
            weights = weights.gather(-1, idx)
        b_s = trace[layer_name(layer, "mlp_norm")].shape[:2]
        for point, t in (("router_logits", logits), ("topk_idx", idx), ("topk_weights", weights)):
            trace.record(layer_name(layer, point), t.reshape(*b_s, -1))
    return hook
