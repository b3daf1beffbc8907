"""The GPT-OSS stack: one class per block, parameters named as in the HF checkpoint.

`Transformer.forward` runs the whole model with an optional KV cache and `Trace`;
`Transformer.layer_forward` runs one decoder layer alone, which is what teacher-forced parity needs.
The math the blocks call comes in as `BlockFunctions`: the reference ones by default; the fused
kernels or a bug-zoo fault replace some of them (`backends.block_functions`), so this module
imports neither.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ..config import ModelSpec
from ..trace import Trace, layer_name, record
from .attention import LayerCache, attention
from .moe import moe
from .norm import rms_norm
from .rope import apply_rope, cos_sin


@dataclasses.dataclass(frozen=True)
class BlockFunctions:
    """The functions the model calls, each with the signature of the reference one named here."""
    rms_norm: Callable     # model/norm.py
    cos_sin: Callable      # model/rope.py
    apply_rope: Callable   # model/rope.py
    attention: Callable    # model/attention.py
    moe: Callable          # model/moe.py

    def replace(self, **functions: Callable) -> "BlockFunctions":
        return dataclasses.replace(self, **functions)


REFERENCE = BlockFunctions(rms_norm, cos_sin, apply_rope, attention, moe)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, fns: BlockFunctions) -> torch.Tensor:
        return fns.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.spec, self.layer = spec, layer
        d = spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, spec.num_heads * d)
        self.k_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * d)
        self.v_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * d)
        self.o_proj = nn.Linear(spec.num_heads * d, spec.hidden_size)
        self.sinks = nn.Parameter(torch.empty(spec.num_heads))

    def forward(self, h, cos, sin, pos: int, cache: LayerCache | None, fns: BlockFunctions, trace: Trace | None):
        b, s, _ = h.shape
        d = self.spec.head_dim
        q = fns.apply_rope(self.q_proj(h).view(b, s, -1, d), cos, sin)
        k = fns.apply_rope(self.k_proj(h).view(b, s, -1, d), cos, sin)
        v = self.v_proj(h).view(b, s, -1, d)
        for point, t in (("q", q), ("k", k), ("v", v)):
            record(trace, layer_name(self.layer, point), t)
        keys, values, k_start = (k, v, pos) if cache is None else cache.extend(k, v, pos)
        core = fns.attention(q, keys, values, self.sinks, window=self.spec.window_of(self.layer),
                      q_start=pos, k_start=k_start).reshape(b, s, -1)
        record(trace, layer_name(self.layer, "attn_core"), core)
        return self.o_proj(core)


class Experts(nn.Module):
    """Dense expert weights in the HF layout: gate_up [E, H, 2I] (interleaved), down [E, I, H]."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        e, hdim, inter = spec.num_experts, spec.hidden_size, spec.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, hdim, 2 * inter))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * inter))
        self.down_proj = nn.Parameter(torch.empty(e, inter, hdim))
        self.down_proj_bias = nn.Parameter(torch.empty(e, hdim))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.spec, self.layer = spec, layer
        self.router = nn.Linear(spec.hidden_size, spec.num_experts)
        self.experts = Experts(spec)

    def forward(self, h, fns: BlockFunctions, trace: Trace | None):
        b, s, hdim = h.shape
        x = self.experts
        out, logits, idx, weights = fns.moe(
            h.reshape(-1, hdim), self.router.weight, self.router.bias, x.gate_up_proj,
            x.gate_up_proj_bias, x.down_proj, x.down_proj_bias, k=self.spec.experts_per_token,
            alpha=self.spec.swiglu_alpha, limit=self.spec.swiglu_limit)
        for point, t in (("router_logits", logits), ("topk_idx", idx), ("topk_weights", weights)):
            record(trace, layer_name(self.layer, point), t.view(b, s, -1))
        return out.view(b, s, hdim)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, layer)

    def forward(self, x, cos, sin, pos, cache, fns, trace, mlp_input: torch.Tensor | None = None):
        """x + attention, then + MLP. `mlp_input` replaces the attention block's result as the MLP
        block's input (teacher forcing at block granularity); the attention block still runs."""
        x = self.attention_block(x, cos, sin, pos, cache, fns, trace)
        return self.mlp_block(x if mlp_input is None else mlp_input, fns, trace)

    def attention_block(self, x, cos, sin, pos, cache, fns, trace):
        name = lambda point: layer_name(self.layer, point)  # noqa: E731
        record(trace, name("input"), x)
        h = self.input_layernorm(x, fns)
        record(trace, name("attn_norm"), h)
        a = self.self_attn(h, cos, sin, pos, cache, fns, trace)
        record(trace, name("attn_out"), a)
        x = x + a
        record(trace, name("resid_attn"), x)
        return x

    def mlp_block(self, x, fns, trace):
        name = lambda point: layer_name(self.layer, point)  # noqa: E731
        h = self.post_attention_layernorm(x, fns)
        record(trace, name("mlp_norm"), h)
        m = self.mlp(h, fns, trace)
        record(trace, name("mlp_out"), m)
        x = x + m
        record(trace, name("resid_mlp"), x)
        return x


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class Transformer(nn.Module):
    """Our GPT-OSS. Build with `Transformer.from_state_dict(spec, canonical_state_dict)`; `blocks`
    are the functions its blocks call (`backends.block_functions(...)` for another backend or a fault)."""

    def __init__(self, spec: ModelSpec, blocks: BlockFunctions = REFERENCE,
                 angle_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        self.blocks = blocks
        self.angle_dtype = angle_dtype
        self.model = Backbone(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    @classmethod
    def from_state_dict(cls, spec: ModelSpec, state: dict[str, torch.Tensor], blocks: BlockFunctions = REFERENCE,
                        angle_dtype: torch.dtype = torch.float32) -> "Transformer":
        """Wrap the given tensors without copying them (so two models can share one set of weights).
        Missing or unexpected names raise; dtypes and devices are whatever the tensors have."""
        with torch.device("meta"):
            model = cls(spec, blocks, angle_dtype)
        model.load_state_dict(state, strict=True, assign=True)
        return model

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache(self.spec.window_of(i)) for i in range(self.spec.num_layers)]

    def rope_tables(self, pos: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(pos, pos + seq, device=device)
        return self.blocks.cos_sin(self.spec, positions, self.dtype, self.angle_dtype)

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, cache: list[LayerCache] | None = None,
                trace: Trace | None = None) -> torch.Tensor:
        """input_ids [B, S] at absolute positions start_pos.. -> logits [B, S, V] in the model dtype.
        With a cache, earlier tokens are attended to (and the cache is extended)."""
        x = self.model.embed_tokens(input_ids)
        record(trace, "embed", x)
        cos, sin = self.rope_tables(start_pos, input_ids.shape[1], input_ids.device)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, start_pos, None if cache is None else cache[i], self.blocks, trace)
        return self.head(x, trace)

    def head(self, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        h = self.model.norm(x, self.blocks)
        record(trace, "final_norm", h)
        logits = self.lm_head(h)
        record(trace, "logits", logits)
        return logits

    def layer_forward(self, layer: int, x: torch.Tensor, start_pos: int = 0, trace: Trace | None = None,
                      mlp_input: torch.Tensor | None = None) -> torch.Tensor:
        """One decoder layer on a given residual stream x [B, S, H] (no cache): teacher forcing.
        With `mlp_input`, the MLP block is fed that instead of the attention block's output."""
        cos, sin = self.rope_tables(start_pos, x.shape[1], x.device)
        return self.model.layers[layer](x, cos, sin, start_pos, None, self.blocks, trace, mlp_input)
