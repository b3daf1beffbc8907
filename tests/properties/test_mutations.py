"""Every law can fail: for each `check_<law>` of the suite, a mutant of its subject (a bug-zoo fault's
mutant function from `model/faults.py`, or a small change defined or monkeypatched here) on which
the law is violated by a case the law's own strategy generates. A law that no mutant can break
would be a law that checks nothing.

`test_every_law_has_a_mutation` keeps this table complete as laws are added.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable

import pytest
import torch
from hypothesis import strategies as st

from gptoss_verify.backends import block_functions
from gptoss_verify.config import ModelSpec, preset
from gptoss_verify.formats import mxfp4
from gptoss_verify.model import REFERENCE, Transformer
from gptoss_verify.model import attention as attention_mod
from gptoss_verify.model import model as model_mod
from gptoss_verify.model import moe as moe_mod
from gptoss_verify.model import rope as rope_mod
from gptoss_verify.model.faults import FAULTS

from . import test_model, test_mxfp4, test_norm, test_routing, test_sinks, test_swiglu, test_window, test_yarn
from .backends import first_violation
from .strategies import (attn_cases, model_cases, mxfp4_cases, norm_cases, rope_cases, route_cases,
                         swiglu_cases, yarn_specs)
from .test_swiglu import swiglu_through_moe

LAW_MODULES = (test_sinks, test_window, test_yarn, test_swiglu, test_routing, test_norm, test_mxfp4, test_model)


# ---- the mutants ----------------------------------------------------------------------------
def mutant_of(name: str):
    """The bug-zoo mutant of a fault (a function with the signature of the one it replaces)."""
    return FAULTS[name].mutant


def visible_through(attention):
    """`visible(q_pos, k_pos, window)` read off an attention function: one query, one key, zero
    scores and a zero sink, so the key's probability is 1/2 if it is visible and 0 if not."""
    def visible(q_pos, k_pos, window):
        zero = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
        out = attention(zero, zero, torch.ones_like(zero), torch.zeros(1, dtype=torch.float64), window=window,
                        q_start=int(q_pos[0]), k_start=int(k_pos[0]))
        return (out != 0).view(1, 1)
    return visible


def rope_with(**overrides):
    """The rope module's functions with some replaced (the YaRN laws take the module)."""
    names = ("correction_range", "inv_freq", "cos_sin", "apply_rope")
    return types.SimpleNamespace(**{**{n: getattr(rope_mod, n) for n in names}, **overrides})


def inv_freq_truncated(spec, dtype=torch.float32, truncate=None):
    """`yarn-truncate` one level below `cos_sin`, where the inv_freq laws look: the range always rounded."""
    return rope_mod.inv_freq(spec, dtype, truncate=True)


ROPE_TRUNCATED = rope_with(inv_freq=inv_freq_truncated, cos_sin=mutant_of("yarn-truncate"))


def visible_strict(q_pos, k_pos, window):
    """`kj <= qi` became `kj < qi`: a query no longer sees its own key."""
    qi, kj = q_pos[:, None], k_pos[None, :]
    mask = kj < qi
    if window is not None:
        mask &= kj > qi - window
    return mask


def inv_freq_blend_swapped(spec, dtype=torch.float32, truncate=None):
    """interp and extrap exchanged in the ramp blend."""
    d = spec.head_dim
    extrap = 1.0 / spec.rope_theta ** (torch.arange(0, d, 2, dtype=dtype) / d)
    if spec.rope_factor == 1.0:
        return extrap
    low, high = rope_mod.correction_range(spec, truncate)
    ramp = ((torch.arange(d // 2, dtype=dtype) - low) / (high - low + 1e-3 * (low == high))).clamp(0, 1)
    return extrap * ramp + extrap / spec.rope_factor * (1 - ramp)


def apply_rope_sign_flipped(x, cos, sin):
    """`x2·cos + x1·sin` became `x2·cos − x1·sin`: no longer a rotation."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos - x1 * sin), dim=-1)


def _swiglu_variant(up_rule):
    def swiglu(gate_up, alpha, limit):
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        gate = gate.clamp(max=limit)
        return gate * torch.sigmoid(alpha * gate) * up_rule(up, limit)
    return swiglu


swiglu_up_clamped_above_only = _swiglu_variant(lambda up, lim: up.clamp(max=lim) + 1)
swiglu_plus_one_before_clamp = _swiglu_variant(lambda up, lim: (up + 1).clamp(-lim, lim))
swiglu_plus_one_lost_when_clamped = _swiglu_variant(
    lambda up, lim: torch.where(up.abs() > lim, up.sign() * lim, up + 1))


def moe_bias_dropped(h, w, b, *args, **kwargs):
    return moe_mod.moe(h, w, torch.zeros_like(b), *args, **kwargs)


def moe_bias_rolled(h, w, b, *args, **kwargs):
    """Expert e reads expert e − 1's router bias: not equivariant under relabelling."""
    return moe_mod.moe(h, w, b.roll(1), *args, **kwargs)


def count_ties_strict(logits, k, *, rel_gap=2.0 ** -8):
    """`<=` became `<`: exact ties with rel_gap 0 go unreported."""
    if k == logits.shape[-1]:
        return 0
    top = torch.topk(logits.double(), k + 1, dim=-1).values
    inside, outside = top[:, k - 1], top[:, k]
    return int((inside - outside < rel_gap * torch.maximum(inside.abs(), outside.abs())).sum())


def rms_norm_no_sqrt(x, w, eps):
    """rsqrt became reciprocal."""
    return w * x / (x.pow(2).mean(-1, keepdim=True) + eps)


_RMS_INIT = model_mod.RMSNorm.__init__


def rmsnorm_class_default_eps(self, size, eps):
    """The module ignores the config and keeps the class default 1e-6."""
    _RMS_INIT(self, size, 1e-6)


def codec(**overrides):
    """The MXFP4 codec with some functions replaced."""
    fns = dict(decode=mxfp4.decode, encode=mxfp4.encode, to_hf_dense=mxfp4.to_hf_dense)
    return types.SimpleNamespace(**{**fns, **overrides})


def decode_high_nibble_first(blocks, scales, dtype=torch.bfloat16):
    return mxfp4.decode(((blocks & 0x0F) << 4) | (blocks >> 4), scales, dtype)


def decode_bias_126(blocks, scales, dtype=torch.bfloat16):
    return mxfp4.decode(blocks, scales, dtype) * 2


def to_hf_dense_reshaped(blocks, scales, dtype=torch.bfloat16):
    """Reshape where a transpose belongs: right shape, wrong elements."""
    dense = mxfp4.decode(blocks, scales, dtype)
    return dense.reshape(*dense.shape[:-2], dense.shape[-1], dense.shape[-2])


def attention_reads_neighbour_row(q, k, v, sinks, **kwargs):
    """Keys and values taken from the previous batch row (a batch stride off by one)."""
    return _ATTENTION(q, k.roll(1, 0), v.roll(1, 0), sinks, **kwargs)


_ATTENTION = attention_mod.attention


# ---- the table ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Mutation:
    law: Callable
    what: str
    subject: Callable[[pytest.MonkeyPatch], object]  # patches what it must, returns the impl to check
    cases: object  # the hypothesis strategy of the law's test
    fault: str | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)
    n: int = 50

    @property
    def id(self) -> str:
        return f"{self.law.__name__[6:]}--{self.fault or self.what}"


def same(value):
    return lambda mp: value


def patched(target, name, value, result):
    def subject(mp):
        mp.setattr(target, name, value)
        return result
    return subject


ATTN = attention_mod.attention
MODEL_CASES = model_cases(max_seq=12)

MUTATIONS = [
    # sinks
    Mutation(test_sinks.check_neg_inf_sink_is_causal_softmax, "mask-strict-less",
             patched(attention_mod, "visible", visible_strict, ATTN), attn_cases()),
    Mutation(test_sinks.check_sink_rescales_rows, "", same(mutant_of("sink-scaled")), attn_cases(),
             fault="sink-scaled"),
    Mutation(test_sinks.check_probabilities_sum_to_one_minus_sink, "", same(mutant_of("sink-dropped")), attn_cases(),
             fault="sink-dropped"),
    Mutation(test_sinks.check_shift_invariance, "", same(mutant_of("sink-scaled")), attn_cases(), fault="sink-scaled"),
    Mutation(test_sinks.check_sink_gradient, "", same(mutant_of("sink-scaled")), attn_cases(), fault="sink-scaled"),
    Mutation(test_sinks.check_sink_gradient, "", same(mutant_of("sink-dropped")), attn_cases(), fault="sink-dropped"),
    Mutation(test_sinks.check_huge_sinks_finite, "", same(mutant_of("sink-no-max")), attn_cases(score_scale=12.0),
             fault="sink-no-max", kwargs=dict(dtype=torch.float16)),
    # window masks
    Mutation(test_window.check_visible_fn, "", same(visible_through(mutant_of("window-129"))), test_window.ijw(),
             fault="window-129", n=200),
    Mutation(test_window.check_visible_fn, "", same(visible_through(mutant_of("window-127"))), test_window.ijw(),
             fault="window-127", n=200),
    Mutation(test_window.check_visible_fn, "mask-strict-less", same(visible_strict), test_window.ijw(), n=200),
    Mutation(test_window.check_visibility_in_attention, "", same(mutant_of("window-127")), attn_cases(sink_scale=0.5),
             fault="window-127"),
    Mutation(test_window.check_visibility_in_attention, "mask-strict-less",
             patched(attention_mod, "visible", visible_strict, ATTN), attn_cases(sink_scale=0.5)),
    Mutation(test_window.check_window_covering_is_causal, "", same(mutant_of("window-127")),
             test_window.covering_windows(attn_cases()), fault="window-127"),
    Mutation(test_window.check_keys_per_query, "", same(mutant_of("window-129")),
             test_window.from_position_zero(attn_cases(sink_scale=0.5)), fault="window-129"),
    Mutation(test_window.check_layer_pattern, "odd-layers-slide",
             patched(ModelSpec, "is_sliding", lambda self, layer: layer % 2 == 1, Transformer), MODEL_CASES, n=10),
    Mutation(test_window.check_chunked_prefill_then_decode, "", same(block_functions("reference", ["window-129"])),
             model_cases(), fault="window-129"),
    Mutation(test_window.check_chunked_prefill_then_decode, "cache-never-trims",
             patched(Transformer, "new_cache",
                     lambda self: [attention_mod.LayerCache(None) for _ in range(self.spec.num_layers)], "reference"),
             model_cases()),
    # YaRN
    Mutation(test_yarn.check_inv_freq_closed_form, "", same(ROPE_TRUNCATED), yarn_specs(), fault="yarn-truncate"),
    Mutation(test_yarn.check_spec_anchors, "", same(ROPE_TRUNCATED), st.just(preset("gpt-oss-20b")),
             fault="yarn-truncate", n=1),
    Mutation(test_yarn.check_spec_anchors, "", same(rope_with(cos_sin=mutant_of("yarn-no-concentration"))),
             st.just(preset("gpt-oss-20b")), fault="yarn-no-concentration", n=1),
    Mutation(test_yarn.check_factor_one_is_plain_rope, "factor-hard-coded-32",
             patched(rope_mod, "inv_freq", lambda spec, dtype=torch.float32, truncate=None:
                     _INV_FREQ(spec.replace(rope_factor=32.0), dtype, truncate), rope_mod), rope_cases()),
    Mutation(test_yarn.check_truncate_moves_exactly, "", same(ROPE_TRUNCATED), yarn_specs(scaled=True),
             fault="yarn-truncate"),
    Mutation(test_yarn.check_inv_freq_decreasing, "ramp-blend-swapped",
             patched(rope_mod, "inv_freq", inv_freq_blend_swapped, rope_mod), yarn_specs()),
    Mutation(test_yarn.check_rotation_scales_pairs, "", same(rope_with(apply_rope=mutant_of("rope-interleaved"))),
             rope_cases(), fault="rope-interleaved"),
    Mutation(test_yarn.check_rotation_scales_pairs, "", same(rope_with(cos_sin=mutant_of("yarn-no-concentration"))),
             rope_cases(scaled=True), fault="yarn-no-concentration"),
    Mutation(test_yarn.check_relative_position, "rotation-sign-flipped",
             patched(rope_mod, "apply_rope", apply_rope_sign_flipped, rope_mod), rope_cases()),
    # clamped SwiGLU
    Mutation(test_swiglu.check_gate_clamped_from_above_only, "",
             same(swiglu_through_moe(mutant_of("gate-clamp-symmetric"))), swiglu_cases(), fault="gate-clamp-symmetric"),
    Mutation(test_swiglu.check_up_clamped_both_sides, "up-clamped-above-only", same(swiglu_up_clamped_above_only),
             swiglu_cases()),
    Mutation(test_swiglu.check_identity_inside_box, "plus-one-before-clamp", same(swiglu_plus_one_before_clamp),
             swiglu_cases()),
    Mutation(test_swiglu.check_continuous_at_boundaries, "plus-one-lost-when-clamped",
             same(swiglu_plus_one_lost_when_clamped), swiglu_cases()),
    Mutation(test_swiglu.check_interleave, "", same(swiglu_through_moe(mutant_of("gate-up-halves"))), swiglu_cases(),
             fault="gate-up-halves"),
    # routing
    Mutation(test_routing.check_weights_positive_sum_to_one, "", same(mutant_of("router-softmax-all")), route_cases(),
             fault="router-softmax-all"),
    Mutation(test_routing.check_indices_are_top_k, "router-bias-dropped", same(moe_bias_dropped), route_cases()),
    Mutation(test_routing.check_softmax_topk_renormalise, "", same(mutant_of("router-softmax-all")), route_cases(),
             fault="router-softmax-all"),
    Mutation(test_routing.check_permutation_equivariant, "router-bias-rolled", same(moe_bias_rolled), route_cases()),
    Mutation(test_routing.check_ties_reported, "strict-less-tie-test", same(count_ties_strict),
             route_cases(tie=True)),
    # RMSNorm
    Mutation(test_norm.check_scale_law, "rsqrt-became-reciprocal", same(rms_norm_no_sqrt), norm_cases()),
    Mutation(test_norm.check_float32_inside, "", same(mutant_of("norm-cast-first")), norm_cases(),
             fault="norm-cast-first"),
    Mutation(test_norm.check_float32_inside, "", same(mutant_of("norm-cast-first")), norm_cases(),
             fault="norm-cast-first", kwargs=dict(dtype=torch.float16)),
    Mutation(test_norm.check_eps, "", same(mutant_of("norm-eps-1e-6")), norm_cases(), fault="norm-eps-1e-6"),
    Mutation(test_norm.check_eps_configured, "norm-module-eps-1e-6",
             patched(model_mod.RMSNorm, "__init__", rmsnorm_class_default_eps, Transformer), st.just(None), n=1),
    # MXFP4
    Mutation(test_mxfp4.check_byte_table, "high-nibble-first", same(codec(decode=decode_high_nibble_first)),
             mxfp4_cases()),
    Mutation(test_mxfp4.check_every_byte_at_scale_127, "scale-bias-126", same(codec(decode=decode_bias_126)),
             st.just(None), n=1),
    Mutation(test_mxfp4.check_grid_round_trip, "emax-1", patched(mxfp4, "E2M1_EMAX", 1, mxfp4), mxfp4_cases()),
    Mutation(test_mxfp4.check_round_to_nearest, "emax-1", patched(mxfp4, "E2M1_EMAX", 1, mxfp4), mxfp4_cases()),
    Mutation(test_mxfp4.check_saturation, "emax-3", patched(mxfp4, "E2M1_EMAX", 3, mxfp4), mxfp4_cases()),
    Mutation(test_mxfp4.check_hf_orientation, "reshape-for-transpose", same(codec(to_hf_dense=to_hf_dense_reshaped)),
             mxfp4_cases(), n=15),
    # whole model
    Mutation(test_model.check_rows_independent, "attention-reads-neighbour-row",
             same(REFERENCE.replace(attention=attention_reads_neighbour_row)), MODEL_CASES,
             kwargs=dict(dtype=torch.float32)),
    Mutation(test_model.check_offset_with_cache_equals_prefix, "rope-ignores-start-pos",
             patched(Transformer, "rope_tables", lambda self, pos, seq, device: _ROPE_TABLES(self, 0, seq, device),
                     "reference"), MODEL_CASES),
    Mutation(test_model.check_batch_composition_float64, "attention-reads-neighbour-row",
             same(REFERENCE.replace(attention=attention_reads_neighbour_row)), MODEL_CASES),
]

_INV_FREQ = rope_mod.inv_freq
_ROPE_TABLES = Transformer.rope_tables


def _call(law: Callable):
    """Laws without a generated case (one fixed subject) take only the implementation."""
    if len(inspect.signature(law).parameters) == 1:
        return lambda impl, case, **kw: law(impl, **kw)
    return law


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.id)
def test_mutation_is_killed(mutation: Mutation, monkeypatch):
    impl = mutation.subject(monkeypatch)
    case = first_violation(_call(mutation.law), impl, mutation.cases, mutation.n, **mutation.kwargs)
    assert case is not None, f"{mutation.law.__name__} holds on {mutation.n} cases under {mutation.id}"


def test_every_law_has_a_mutation():
    laws = {f for m in LAW_MODULES for name, f in vars(m).items()
            if name.startswith("check_") and callable(f) and f.__module__ == m.__name__}
    covered = {m.law for m in MUTATIONS}
    missing = sorted(f.__name__ for f in laws - covered)
    assert not missing, f"laws without a mutation that breaks them: {missing}"


def test_faults_used_exist():
    assert {m.fault for m in MUTATIONS if m.fault} <= set(FAULTS)
