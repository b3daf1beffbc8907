"""Each known transform, applied to one tensor of one layer of a real checkpoint of ours, is
diagnosed by name and layer, and nothing else is reported as different."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gptoss_verify.diff.compare import diff

from . import corpus as c
from .conftest import SQUARE, TINY

L = "model.layers.{}."


@dataclasses.dataclass
class Case:
    id: str
    a: str  # base checkpoint key
    build: Callable[[dict[str, Path], Path], Path]
    expected: dict[str, str]  # canonical tensor -> transform name
    exact: bool | None = None  # the diagnosis says exact (None: not asserted)


def _qkv_regrouped(base, out):
    """q, k, v of layer 1 with Megatron's grouped rows read as flat (OpenAI output)."""
    regroup = c.regroup_qkv(TINY)
    _, stream = c.layouts.module("hf").read(base["mx"])
    held = {}

    def edited():
        for name, t in stream:
            if name.startswith(L.format(1) + "self_attn.") and name.endswith(("q_proj.weight", "k_proj.weight",
                                                                                 "v_proj.weight")):
                held[name] = t
                if len(held) < 3:
                    continue
                p = L.format(1) + "self_attn."
                q, k, v = regroup(held[p + "q_proj.weight"], held[p + "k_proj.weight"], held[p + "v_proj.weight"])
                # the stream order is q.w, q.b, k.w, k.b, v.w: emit the held weights now
                yield p + "q_proj.weight", q
                yield p + "k_proj.weight", k
                yield name, v
                continue
            yield name, t
    c.layouts.module("openai").write(edited(), TINY, out)
    return out


def _scale_exponent(base, out):
    name = L.format(0) + "mlp.experts.gate_up_proj"
    tensors = c.load_file(next(base["mx"].glob("*.safetensors")))
    blocks, scales = c.requantize_one_exponent_low(tensors[name + "_blocks"], tensors[name + "_scales"])
    return c.edit_safetensors(base["mx"], out, {name + "_blocks": lambda _: blocks, name + "_scales": lambda _: scales})


def _vocab_padded(base, out, rows: int, nonzero: bool):
    spec = TINY.replace(vocab_size=TINY.vocab_size + rows)
    gen = torch.Generator().manual_seed(1)

    def pad(t, fill):
        extra = torch.randn(rows, t.shape[1], generator=gen).to(t.dtype) if fill else torch.zeros(rows, t.shape[1], dtype=t.dtype)
        return torch.cat([t, extra])
    return c.rewrite(base["hf"], out, "hf", {"model.embed_tokens.weight": lambda t: pad(t, nonzero),
                                             "lm_head.weight": lambda t: pad(t, False)}, spec=spec)


def _vocab_cut(base, out):
    keep = 320
    return c.edit_safetensors(base["hf"], out, {"model.embed_tokens.weight": lambda t: t[:keep],
                                                "lm_head.weight": lambda t: t[:keep]}, config={"vocab_size": keep})


def _experts_permuted_mx(base, out):
    name = L.format(1) + "mlp.experts.gate_up_proj"
    swap = c.swap_rows(1, 5)
    return c.rewrite(base["mx"], out, "hf", {name + "_blocks": swap, name + "_scales": swap}, mxfp4=True)


CASES = [
    # transpose: square (values only) in bf16, through Megatron, re-encoded MXFP4; non-square (shape)
    Case("transpose-square-hf-bf16", "square-hf",
         lambda b, o: c.rewrite(b["square-hf"], o, "hf", {L.format(1) + "mlp.experts.down_proj": c.transpose}),
         {L.format(1) + "mlp.experts.down_proj": "transpose"}, exact=True),
    Case("transpose-square-megatron", "square-hf",
         lambda b, o: c.rewrite(b["square-hf"], o, "megatron", {L.format(2) + "mlp.experts.down_proj": c.transpose},
                                tp=2, ep=2),
         {L.format(2) + "mlp.experts.down_proj": "transpose"}, exact=True),
    Case("transpose-square-mxfp4", "square-mx",
         lambda b, o: c.rewrite(b["square-mx"], o, "hf", {L.format(3) + "mlp.experts.down_proj": c.transpose},
                                dense=True, mxfp4=True),
         {L.format(3) + "mlp.experts.down_proj": "transpose"}),
    Case("transpose-nonsquare-hf-file", "hf",
         lambda b, o: c.edit_safetensors(b["hf"], o, {L.format(0) + "mlp.experts.down_proj": c.transpose}),
         {L.format(0) + "mlp.experts.down_proj": "transpose"}, exact=True),
    # gate/up
    Case("gate-up-halves-mxfp4", "mx",
         lambda b, o: c.rewrite(b["mx"], o, "hf", {L.format(2) + "mlp.experts.gate_up_proj": c.to_halves},
                                dense=True, mxfp4=True),
         {L.format(2) + "mlp.experts.gate_up_proj": "gate-up-halves"}, exact=True),
    Case("gate-up-halves-bias-openai", "mx",
         lambda b, o: c.rewrite(b["mx"], o, "openai", {L.format(0) + "mlp.experts.gate_up_proj_bias": c.to_halves}),
         {L.format(0) + "mlp.experts.gate_up_proj_bias": "gate-up-halves"}, exact=True),
    # q/k/v
    Case("qkv-not-grouped-openai", "mx", _qkv_regrouped,
         {L.format(1) + f"self_attn.{p}_proj.weight": "qkv-not-grouped-by-kv-head" for p in "qkv"}, exact=True),
    Case("heads-permuted-dist", "mx",
         lambda b, o: c.rewrite(b["mx"], o, "megatron-dist",
                                {L.format(3) + "self_attn.q_proj.weight": c.swap_heads(0, 5, TINY.head_dim)}, tp=2),
         {L.format(3) + "self_attn.q_proj.weight": "heads-permuted"}, exact=True),
    # experts, router
    Case("experts-permuted-mxfp4", "mx", _experts_permuted_mx,
         {L.format(1) + "mlp.experts.gate_up_proj": "experts-permuted"}, exact=True),
    Case("experts-permuted-megatron", "hf",
         lambda b, o: c.rewrite(b["hf"], o, "megatron", {L.format(0) + "mlp.experts.down_proj_bias": c.swap_rows(0, 7)},
                                tp=2, ep=2),
         {L.format(0) + "mlp.experts.down_proj_bias": "experts-permuted"}, exact=True),
    Case("router-rows-permuted-file", "hf",
         lambda b, o: c.edit_safetensors(b["hf"], o, {L.format(2) + "mlp.router.weight": c.swap_rows(2, 6)}),
         {L.format(2) + "mlp.router.weight": "router-rows-permuted"}, exact=True),
    # vocabulary
    Case("vocab-padding-nonzero", "hf", lambda b, o: _vocab_padded(b, o, 128, True),
         {"model.embed_tokens.weight": "vocab-padding-nonzero", "lm_head.weight": "vocab-padded"}, exact=True),
    Case("vocab-cut-file", "hf", _vocab_cut,
         {"model.embed_tokens.weight": "vocab-cut", "lm_head.weight": "vocab-cut"}, exact=True),
    # MXFP4 bytes
    Case("scale-bias-125-file", "mx",
         lambda b, o: c.edit_safetensors(b["mx"], o, {L.format(1) + "mlp.experts.down_proj_scales": c.add_to_scales(-2)}),
         {L.format(1) + "mlp.experts.down_proj": "mxfp4-scale-bias"}, exact=True),
    Case("scale-bias-openai", "mx",
         lambda b, o: c.rewrite(b["mx"], o, "openai", {L.format(3) + "mlp.experts.gate_up_proj_scales": c.add_to_scales(-2)}),
         {L.format(3) + "mlp.experts.gate_up_proj": "mxfp4-scale-bias"}, exact=True),
    Case("scale-one-exponent-low", "mx", _scale_exponent,
         {L.format(0) + "mlp.experts.gate_up_proj": "mxfp4-scale-exponent"}),
    Case("nibbles-swapped-file", "mx",
         lambda b, o: c.edit_safetensors(b["mx"], o, {L.format(2) + "mlp.experts.down_proj_blocks": c.swap_nibbles}),
         {L.format(2) + "mlp.experts.down_proj": "nibble-order-swapped"}, exact=True),
    Case("nibbles-swapped-decoded-megatron", "mx",
         lambda b, o: c.rewrite(b["mx"], o, "megatron", {L.format(1) + "mlp.experts.gate_up_proj_blocks": c.swap_nibbles},
                                tp=2, ep=2),
         {L.format(1) + "mlp.experts.gate_up_proj": "nibble-order-swapped"}, exact=True),
    # signs and factors
    Case("sign-flip-rows", "hf",
         lambda b, o: c.edit_safetensors(b["hf"], o, {L.format(1) + "self_attn.o_proj.weight": c.negate_rows(slice(3, 6))}),
         {L.format(1) + "self_attn.o_proj.weight": "sign-flip"}, exact=True),
    Case("sinks-scaled-openai", "mx",
         lambda b, o: c.rewrite(b["mx"], o, "openai", {L.format(2) + "self_attn.sinks": c.scale(0.25)}),
         {L.format(2) + "self_attn.sinks": "sinks-scaled"}, exact=True),
    Case("scalar-factor-megatron", "hf",
         lambda b, o: c.rewrite(b["hf"], o, "megatron", {L.format(3) + "post_attention_layernorm.weight": c.scale(1.5)},
                                tp=2, ep=2),
         {L.format(3) + "post_attention_layernorm.weight": "scalar-factor"}),
    # chosen by a hostile check (issue 17): other tensors, layers, layouts and shapes of the same mistakes
    Case("transpose-one-expert-square", "square-hf",
         lambda b, o: c.edit_safetensors(b["square-hf"], o, {L.format(2) + "mlp.experts.down_proj":
                                                             c.on_expert(3, lambda x: x.t().contiguous())}),
         {L.format(2) + "mlp.experts.down_proj": "transpose"}, exact=True),
    Case("router-rows-cycled-last-layer-megatron", "hf",
         lambda b, o: c.rewrite(b["hf"], o, "megatron", {L.format(3) + "mlp.router.weight": c.cycle_rows([1, 4, 6]),
                                                         L.format(3) + "mlp.router.bias": c.cycle_rows([1, 4, 6])},
                                tp=2, ep=2),
         {L.format(3) + "mlp.router.weight": "router-rows-permuted", L.format(3) + "mlp.router.bias": "router-rows-permuted"},
         exact=True),
    Case("gate-up-interleaved-mxfp4-layer0", "mx",
         lambda b, o: c.rewrite(b["mx"], o, "hf", {L.format(0) + "mlp.experts.gate_up_proj": c.to_interleaved},
                                dense=True, mxfp4=True),
         {L.format(0) + "mlp.experts.gate_up_proj": "gate-up-interleaved"}),
    Case("sinks-doubled-layer1-dist", "mx",
         lambda b, o: c.rewrite(b["mx"], o, "megatron-dist", {L.format(1) + "self_attn.sinks": c.scale(2.0)}, tp=2),
         {L.format(1) + "self_attn.sinks": "sinks-scaled"}, exact=True),
    Case("k-heads-swapped-megatron", "hf",
         lambda b, o: c.rewrite(b["hf"], o, "megatron", {L.format(3) + "self_attn.k_proj.weight": c.swap_heads(0, 1, TINY.head_dim),
                                                         L.format(3) + "self_attn.k_proj.bias": c.swap_heads(0, 1, TINY.head_dim)},
                                tp=2, ep=2),
         {L.format(3) + "self_attn.k_proj.weight": "heads-permuted", L.format(3) + "self_attn.k_proj.bias": "heads-permuted"},
         exact=True),
    Case("scale-bias-129-file", "mx",
         lambda b, o: c.edit_safetensors(b["mx"], o, {L.format(2) + "mlp.experts.down_proj_scales": c.add_to_scales(2)}),
         {L.format(2) + "mlp.experts.down_proj": "mxfp4-scale-bias"}, exact=True),
    Case("sign-flip-whole-bias", "hf",
         lambda b, o: c.edit_safetensors(b["hf"], o, {L.format(2) + "self_attn.o_proj.bias": c.scale(-1.0)}),
         {L.format(2) + "self_attn.o_proj.bias": "sign-flip"}, exact=True),
    Case("constant-offset-file", "hf",
         lambda b, o: c.edit_safetensors(b["hf"], o, {L.format(0) + "input_layernorm.weight": c.offset(-1.0)}),
         {L.format(0) + "input_layernorm.weight": "constant-offset"}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda k: k.id)
def test_transform_is_named(case: Case, base, tmp_path):
    b = case.build(base, tmp_path / "b")
    result = diff(base[case.a], b, consequence=False)
    assert not result.same_model
    found = {t.name: t for t in result.findings}
    assert set(found) == set(case.expected), [f"{t.name}: {t.status} {t.diagnosis}" for t in result.findings]
    for name, transform in case.expected.items():
        t = found[name]
        assert t.diagnosis is not None, f"{name}: undiagnosed ({t.stats})"
        assert t.diagnosis.transform == transform, f"{name}: {t.diagnosis}"
        assert t.layer == (int(name.split(".")[2]) if name.startswith("model.layers.") else None)
        if case.exact is not None:
            assert t.diagnosis.exact == case.exact, t.diagnosis
