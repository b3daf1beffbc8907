"""The bug zoo: faults that shipped in other GPT-OSS implementations, as mutant block functions.

Each `Fault` names the reference function it replaces (one of the block functions the model is
given: `rms_norm`, `cos_sin`, `apply_rope`, `attention`, `moe`) and a mutant with the same
signature that carries the bug; `backends.block_functions(backend, faults)` swaps the mutant in
wherever the backend's table holds that reference function. The parity harness must catch every
fault at its `point`; a fault it cannot see is a bug in the harness. The reference functions
themselves carry no fault.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from . import attention, moe, norm, rope


@dataclasses.dataclass(frozen=True)
class Fault:
    point: str          # the trace point where parity must catch it first
    history: str        # what it is / where it shipped
    replaces: Callable  # the reference block function it stands in for
    mutant: Callable    # the faulty function, with the signature of `replaces`


# ---- RMSNorm ----------------------------------------------------------------------------------
def rms_norm_eps_1e6(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The configured eps ignored for the class default 1e-6."""
    return norm.rms_norm(x, weight, 1e-6)


def rms_norm_cast_first(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalised in float32, then cast to the model dtype before the weight multiplies (Llama order)."""
    wide = x.to(norm.compute_dtype(x.dtype))
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * normed.to(x.dtype)


# ---- RoPE -------------------------------------------------------------------------------------
def cos_sin_truncated(spec, positions: torch.Tensor, dtype: torch.dtype,
                      angle_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The YaRN correction range rounded outwards (floor/ceil) whatever the config's `truncate`."""
    return rope.cos_sin(spec.replace(rope_truncate=True), positions, dtype, angle_dtype)


def cos_sin_unconcentrated(spec, positions: torch.Tensor, dtype: torch.dtype,
                           angle_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin left unscaled by the YaRN concentration."""
    freqs = positions.to(angle_dtype)[..., None] * rope.inv_freq(spec, angle_dtype).to(positions.device)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pairs (2d, 2d + 1) rotated instead of (d, d + D/2)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


# ---- attention --------------------------------------------------------------------------------
def attention_window_plus_one(q, k, v, sinks, *, window, q_start=0, k_start=0):
    """Sliding layers see W + 1 keys."""
    return attention.attention(q, k, v, sinks, window=None if window is None else window + 1,
                               q_start=q_start, k_start=k_start)


def attention_window_minus_one(q, k, v, sinks, *, window, q_start=0, k_start=0):
    """Sliding layers see W − 1 keys."""
    return attention.attention(q, k, v, sinks, window=None if window is None else window - 1,
                               q_start=q_start, k_start=k_start)


def attention_sink_scaled(q, k, v, sinks, *, window, q_start=0, k_start=0):
    """The sink multiplied by the 1/√D score scale like a score (in the scores' dtype)."""
    return attention.attention(q, k, v, sinks.to(q.dtype) * q.shape[-1] ** -0.5, window=window,
                               q_start=q_start, k_start=k_start)


def attention_sink_dropped(q, k, v, sinks, *, window, q_start=0, k_start=0):
    """The sink column left out of the softmax (a sink of −∞)."""
    return attention.attention(q, k, v, torch.full_like(sinks, float("-inf")), window=window,
                               q_start=q_start, k_start=k_start)


def attention_without_max(q, k, v, sinks, *, window, q_start=0, k_start=0):
    """softmax as exp(s) / (Σ exp(s) + exp(sink)) in the input dtype, without subtracting the row
    max: overflows where scores or sinks are large."""
    b, sq, hq, d = q.shape
    rows = max(1, attention._SCORE_BUDGET // (b * hq * k.shape[1]))
    if sq > rows:
        return torch.cat([attention_without_max(q[:, i:i + rows], k, v, sinks, window=window,
                                                q_start=q_start + i, k_start=k_start)
                          for i in range(0, sq, rows)], dim=1)
    hkv = k.shape[2]
    group = hq // hkv
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q.view(b, sq, hkv, group, d), k) * d ** -0.5
    mask = attention.visible(torch.arange(sq, device=q.device) + q_start,
                             torch.arange(k.shape[1], device=q.device) + k_start, window)
    sink = sinks.view(hkv, group, 1, 1).to(scores.dtype)
    expo = scores.exp().masked_fill(~mask, 0)
    probs = expo / (expo.sum(-1, keepdim=True) + sink.exp())
    return torch.einsum("bhgqk,bkhd->bqhgd", probs.to(v.dtype), v).reshape(b, sq, hq, d)


# ---- MoE --------------------------------------------------------------------------------------
def route_softmax_all(h, weight, bias, k):
    """The top-k weights read off a softmax over all experts, not renormalised over the k."""
    logits = torch.nn.functional.linear(h, weight, bias)
    idx = torch.topk(logits, k, dim=-1, sorted=True).indices
    weights = logits.softmax(dim=-1, dtype=norm.compute_dtype(h.dtype)).gather(-1, idx)
    return logits, idx, weights.to(h.dtype)


def swiglu_halves(gate_up, alpha, limit):
    """gate and up read as the two halves of gate_up instead of its even/odd columns."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def swiglu_clamp_symmetric(gate_up, alpha, limit):
    """The gate clamped from below as well as from above."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate, up = gate.clamp(min=-limit, max=limit), up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def _experts(activation=moe.swiglu, bias_after_sum: bool = False) -> Callable:
    """The loop of `moe.experts` with another activation, or with the down bias added once per
    chosen expert after the weighting (so unweighted) instead of inside each expert's output."""
    def experts(h, idx, weights, gate_up, gate_up_bias, down, down_bias, *, alpha, limit):
        out = torch.zeros(h.shape, dtype=norm.compute_dtype(h.dtype), device=h.device)
        for e in torch.unique(idx).tolist():
            token, slot = torch.where(idx == e)
            act = activation(h[token] @ gate_up[e].to(h.dtype) + gate_up_bias[e].to(h.dtype), alpha, limit)
            y = act @ down[e].to(h.dtype)
            if not bias_after_sum:
                y = y + down_bias[e].to(h.dtype)
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
            if bias_after_sum:
                out.index_add_(0, token, down_bias[e].to(out.dtype).expand(len(token), -1))
        return out.to(h.dtype)
    return experts


def _moe(route=moe.route, experts=moe.experts) -> Callable:
    """`moe.moe` built from another router or experts loop."""
    def mixture(h, router_weight, router_bias, gate_up, gate_up_bias, down, down_bias, *, k, alpha, limit):
        logits, idx, weights = route(h, router_weight, router_bias, k)
        out = experts(h, idx, weights, gate_up, gate_up_bias, down, down_bias, alpha=alpha, limit=limit)
        return out, logits, idx, weights
    return mixture


# ---- the zoo ----------------------------------------------------------------------------------
FAULTS: dict[str, Fault] = {
    "window-129": Fault("attn_core", "sliding window of W+1 keys: transformers #39408, mlx-lm #390",
                        attention.attention, attention_window_plus_one),
    "window-127": Fault("attn_core", "sliding window of W-1 keys: Megatron-Bridge #2656 inverse",
                        attention.attention, attention_window_minus_one),
    "sink-scaled": Fault("attn_core", "sink multiplied by the 1/sqrt(D) score scale",
                         attention.attention, attention_sink_scaled),
    "sink-dropped": Fault("attn_core", "sink column left out of the softmax: TransformerEngine #2541",
                          attention.attention, attention_sink_dropped),
    "sink-no-max": Fault("attn_core", "softmax without subtracting the row max (sink included): overflows",
                         attention.attention, attention_without_max),
    "yarn-truncate": Fault("q", "YaRN correction range rounded to 8/18: vLLM #27722, SGLang #14270",
                           rope.cos_sin, cos_sin_truncated),
    "yarn-no-concentration": Fault("q", "cos/sin not multiplied by 0.1·ln(factor)+1",
                                   rope.cos_sin, cos_sin_unconcentrated),
    "rope-interleaved": Fault("q", "rotation of pairs (2d, 2d+1) instead of (d, d+D/2): TensorRT-LLM #16378",
                              rope.apply_rope, apply_rope_interleaved),
    "gate-clamp-symmetric": Fault("mlp_out", "gate clamped on both sides: prime-rl #2365 review claim",
                                  moe.moe, _moe(experts=_experts(activation=swiglu_clamp_symmetric))),
    "gate-up-halves": Fault("mlp_out", "gate/up split in halves instead of even/odd interleave",
                            moe.moe, _moe(experts=_experts(activation=swiglu_halves))),
    "router-softmax-all": Fault("topk_weights", "softmax over all experts, no renormalisation: torchtitan #2258",
                                moe.moe, _moe(route=route_softmax_all)),
    "norm-cast-first": Fault("attn_norm", "RMSNorm casts to the model dtype before the weight (Llama order)",
                             norm.rms_norm, rms_norm_cast_first),
    "norm-eps-1e-6": Fault("attn_norm", "RMSNorm with the class default eps 1e-6 instead of 1e-5",
                           norm.rms_norm, rms_norm_eps_1e6),
    "down-bias-after-weight": Fault("mlp_out", "down bias added once after the weighted sum, unweighted",
                                    moe.moe, _moe(experts=_experts(bias_after_sum=True))),
}
