"""A GPT-OSS forward written the way a user of gptoss-verify would write one for their own engine:
from the model card's description, in plain torch, sharing no code with gptoss_verify's model (it
reads only the case: spec fields, canonical weights, token ids, positions). It computes in float32
whatever the case's dtype (weights rounded to it first, as the harness gives them).

`build()` is correct; `build(bug="sinks-ignored")` drops the attention sinks from the softmax, the
bug transformers #42736 and vLLM #52148 shipped. It exposes logits only, or, with `points=True`,
also `layers.{i}.attn_core` and `layers.{i}.topk_idx`, by the harness's names. Run as a script it is
an out-of-process engine: `python someone_elses_engine.py CASE_DIR DUMP [bug]`.
"""
from __future__ import annotations

import math
import sys

import torch


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def yarn_cos_sin(spec, positions, dim):
    """YaRN as in the GPT-OSS config: interpolate below the correction range, extrapolate above;
    angles in float32 as transformers and OpenAI compute them."""
    base, factor = spec.rope_theta, spec.rope_factor
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)

    def correction_dim(rotations):
        return dim * math.log(spec.rope_original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = correction_dim(spec.rope_beta_fast), correction_dim(spec.rope_beta_slow)
    if spec.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolate) + (1 / pos_freqs) * extrapolate
    mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    angles = positions.float()[..., None] * inv_freq  # float32 angles, as the published references
    return angles.cos() * mscale, angles.sin() * mscale


def rotate(x, cos, sin):  # x [B, S, H, D]; halves, not interleaved
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class Engine:
    precisions = ("float32", "bfloat16")

    def __init__(self, bug: str | None = None, points: bool = False):
        if bug not in (None, "sinks-ignored"):
            raise ValueError(f"unknown bug {bug!r}")
        self.bug = bug
        self.name = "someone-else" + (f" ({bug})" if bug else "")
        self.points = ("logits", "attn_core", "topk_idx") if points else ("logits",)

    def run(self, case):
        spec = case.spec
        w = {n: t.float() for n, t in case.dense_state().items()}  # rounded to the case's dtype, then widened
        ids, pos = case.input_ids, case.positions()
        b, s = ids.shape
        nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        cos, sin = yarn_cos_sin(spec, pos, hd)
        x = w["model.embed_tokens.weight"][ids]
        out = {}
        i_idx = torch.arange(s)
        for layer in range(spec.num_layers):
            p = f"model.layers.{layer}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], spec.rms_norm_eps)
            q = (h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).view(b, s, nh, hd)
            k = (h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).view(b, s, nkv, hd)
            v = (h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).view(b, s, nkv, hd)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            k, v = k.repeat_interleave(nh // nkv, dim=2), v.repeat_interleave(nh // nkv, dim=2)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
            allowed = i_idx[None, :] <= i_idx[:, None]
            if layer % 2 == 0:  # even layers: sliding window (keys at distance < W)
                allowed &= i_idx[:, None] - i_idx[None, :] < spec.sliding_window
            scores = scores.masked_fill(~allowed, float("-inf"))
            if self.bug == "sinks-ignored":
                probs = scores.softmax(-1)
            else:
                sink = w[p + "self_attn.sinks"].view(1, nh, 1, 1).expand(b, nh, s, 1)
                probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
            core = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, nh * hd)
            out[f"layers.{layer}.attn_core"] = core
            x = x + core @ w[p + "self_attn.o_proj.weight"].T + w[p + "self_attn.o_proj.bias"]
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], spec.rms_norm_eps)
            router = h @ w[p + "mlp.router.weight"].T + w[p + "mlp.router.bias"]
            top, idx = router.topk(spec.experts_per_token, dim=-1)
            out[f"layers.{layer}.topk_idx"] = idx
            gates = top.softmax(-1)
            gate_up = torch.einsum("bsh,bskhf->bskf", h, w[p + "mlp.experts.gate_up_proj"][idx]) \
                + w[p + "mlp.experts.gate_up_proj_bias"][idx]
            gate, up = gate_up[..., 0::2].clamp(max=spec.swiglu_limit), \
                gate_up[..., 1::2].clamp(-spec.swiglu_limit, spec.swiglu_limit)
            act = gate * torch.sigmoid(spec.swiglu_alpha * gate) * (up + 1)
            down = torch.einsum("bskf,bskfh->bskh", act, w[p + "mlp.experts.down_proj"][idx]) \
                + w[p + "mlp.experts.down_proj_bias"][idx]
            x = x + (gates[..., None] * down).sum(2)
        x = rms_norm(x, w["model.norm.weight"], spec.rms_norm_eps)
        logits = x @ w["lm_head.weight"].T
        from gptoss_verify.subjects.protocol import Output
        return Output(logits, {n: t for n, t in out.items() if n.split(".")[2] in self.points})


def build(bug: str | None = None, points: bool = False) -> Engine:
    return Engine(bug, points)


def build_sinks_ignored() -> Engine:
    return Engine("sinks-ignored")


def build_with_points(bug: str | None = None) -> Engine:
    return Engine(bug, points=True)


def build_sinks_ignored_with_points() -> Engine:
    return Engine("sinks-ignored", points=True)


if __name__ == "__main__":  # an out-of-process engine: read the case, write the dump
    from safetensors.torch import save_file

    from gptoss_verify.subjects.dump import load_case
    engine = Engine(sys.argv[3] if len(sys.argv) > 3 else None, points=True)
    result = engine.run(load_case(sys.argv[1]))
    save_file({"logits": result.logits.contiguous(), **{n: t.contiguous() for n, t in result.points.items()}},
              sys.argv[2])
