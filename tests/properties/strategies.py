"""Hypothesis strategies shared by the property suite.

Strategies draw small frozen *cases* (shapes, seeds, scales, configurations), never tensors: a
case's repr is short and pastes straight into a regression test, and its tensors are rebuilt from
the seed (`case.tensors(...)`). Every drawn value is rounded through bfloat16 once, so the same
inputs exist exactly in every dtype a law runs in.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
from hypothesis import strategies as st

from gptoss_verify.config import ModelSpec, preset
from gptoss_verify.weights import random_weights

TINY = preset("tiny")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(torch.bfloat16).double()


# ---- attention ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttnCase:
    """Queries at absolute positions q_start.., keys at q_start − prefix.. (so every query sees at
    least its own key); D ≥ number of keys, so one-hot values can read the probabilities out."""
    batch: int
    sq: int
    prefix: int
    kv_heads: int
    group: int
    head_dim: int
    window: int | None
    q_start: int
    seed: int
    sink_scale: float = 4.0
    score_scale: float = 1.0

    @property
    def sk(self) -> int:
        return self.prefix + self.sq

    @property
    def k_start(self) -> int:
        return self.q_start - self.prefix

    @property
    def heads(self) -> int:
        return self.kv_heads * self.group

    def tensors(self, dtype=torch.float64, device="cpu"):
        """q [B, Sq, Hq, D], k, v [B, Sk, Hkv, D], sinks [Hq] (float64 values exact in `dtype`)."""
        g = _gen(self.seed)
        # scores q·k/√D have standard deviation ≈ score_scale
        std = math.sqrt(self.score_scale)
        q = _randn(g, self.batch, self.sq, self.heads, self.head_dim, std=std)
        k = _randn(g, self.batch, self.sk, self.kv_heads, self.head_dim, std=std)
        v = _randn(g, self.batch, self.sk, self.kv_heads, self.head_dim)
        sinks = ((torch.rand(self.heads, generator=g, dtype=torch.float64) * 2 - 1) * self.sink_scale
                 ).to(torch.bfloat16).double()
        return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, sinks))

    def kwargs(self) -> dict:
        return dict(window=self.window, q_start=self.q_start, k_start=self.k_start)


@st.composite
def attn_cases(draw, *, windows=True, max_sq=8, max_prefix=8, sink_scale=None, score_scale=None,
               tiny=False) -> AttnCase:
    """`tiny` keeps shapes fit for the Triton interpreter."""
    sq = draw(st.integers(1, 4 if tiny else max_sq))
    prefix = draw(st.integers(0, 4 if tiny else max_prefix))
    window = draw(st.none() | st.integers(1, sq + prefix + 2)) if windows else None
    return AttnCase(
        batch=draw(st.integers(1, 2)), sq=sq, prefix=prefix,
        kv_heads=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 2] if tiny else [1, 2, 4])),
        head_dim=16 if tiny else draw(st.sampled_from([16, 32])), window=window,
        q_start=prefix + draw(st.integers(0, 40)), seed=draw(st.integers(0, 2 ** 31 - 1)),
        sink_scale=sink_scale if sink_scale is not None else draw(st.sampled_from([0.5, 4.0, 12.0])),
        score_scale=score_scale if score_scale is not None else draw(st.sampled_from([0.5, 2.0])))


def law_mask(case: AttnCase) -> torch.Tensor:
    """[Sq, Sk]: key at position p_k is visible from the query at p_q iff p_q − W < p_k ≤ p_q."""
    qp = torch.arange(case.sq)[:, None] + case.q_start
    kp = torch.arange(case.sk)[None, :] + case.k_start
    mask = kp <= qp
    if case.window is not None:
        mask &= kp > qp - case.window
    return mask


def dense_attention(case: AttnCase, q, k, v, sinks):
    """The law written out in float64, independently of model/attention.py: scores, the mask
    `q_pos − W < k_pos ≤ q_pos`, the sink as one more logit, and the output.
    Returns (probs [B, Hq, Sq, Sk], p_sink [B, Hq, Sq], scores [B, Hq, Sq, Sk], out [B, Sq, Hq, D])."""
    q, k, v, sinks = (t.double() for t in (q, k, v, sinks))
    kv = torch.arange(case.heads) // case.group  # query head h reads kv head h // group
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k[:, :, kv]) / math.sqrt(case.head_dim)
    mask = law_mask(case)
    logits = torch.cat([scores.masked_fill(~mask, -math.inf),
                        sinks[None, :, None, None].expand(case.batch, -1, case.sq, 1)], dim=-1)
    p = torch.softmax(logits, dim=-1)
    probs, p_sink = p[..., :-1], p[..., -1]
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v[:, :, kv])
    return probs, p_sink, scores, out


# ---- RoPE / YaRN -------------------------------------------------------------------------------
@st.composite
def yarn_specs(draw, *, factor_one=False, scaled=False) -> ModelSpec:
    """YaRN configurations around the published one: θ, factor, D, original context, β's, truncate."""
    fast = draw(st.floats(4.0, 64.0))
    factor = 1.0 if factor_one else draw(
        st.floats(2.0, 64.0) if scaled else st.sampled_from([1.0]) | st.floats(2.0, 64.0))
    return TINY.replace(
        rope_theta=draw(st.sampled_from([10000.0, 150000.0, 500000.0]) | st.floats(1e3, 1e6)),
        rope_factor=factor, head_dim=draw(st.sampled_from([16, 32, 64, 128])), num_heads=8, num_kv_heads=2,
        rope_original_max_position=draw(st.sampled_from([1024, 2048, 4096, 8192])),
        rope_beta_fast=fast, rope_beta_slow=draw(st.floats(0.25, min(4.0, fast / 2))),
        rope_truncate=draw(st.booleans()))


@dataclasses.dataclass(frozen=True)
class RopeCase:
    spec: ModelSpec
    positions: tuple[int, ...]
    shift: int
    seed: int


@st.composite
def rope_cases(draw, *, max_position=131072, scaled=False, spec: ModelSpec | None = None) -> RopeCase:
    spec = spec or draw(yarn_specs(scaled=scaled))
    n = draw(st.integers(1, 4))
    positions = tuple(draw(st.lists(st.integers(0, max_position), min_size=n, max_size=n)))
    shift = draw(st.integers(-min(positions), max_position - max(positions)))
    return RopeCase(spec, positions, shift, draw(st.integers(0, 2 ** 31 - 1)))


# ---- SwiGLU ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SwigluCase:
    """Pre-activations [T, 2I] (gate in the even columns, up in the odd ones), spread over
    ±spread·limit so that every side of the clamp box is hit."""
    tokens: int
    inter: int
    alpha: float
    limit: float
    spread: float
    seed: int

    def gate_up(self, dtype=torch.float64, device="cpu") -> torch.Tensor:
        g = _gen(self.seed)
        x = (torch.rand(self.tokens, 2 * self.inter, generator=g, dtype=torch.float64) * 2 - 1) * self.spread * self.limit
        return x.to(torch.bfloat16).to(device=device, dtype=dtype)


@st.composite
def swiglu_cases(draw, *, tiny=False) -> SwigluCase:
    return SwigluCase(tokens=draw(st.integers(1, 4 if tiny else 16)),
                      inter=16 if tiny else draw(st.sampled_from([4, 16, 48])),
                      alpha=draw(st.sampled_from([1.702]) | st.floats(0.5, 3.0)),
                      limit=draw(st.sampled_from([7.0]) | st.floats(1.0, 10.0)),
                      spread=draw(st.floats(1.5, 3.0)), seed=draw(st.integers(0, 2 ** 31 - 1)))


# ---- routing -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RouteCase:
    """A router (weight [E, H], bias [E]) and tokens h [T, H]; `tie_rows` rows get their k-th and
    (k+1)-th logits made exactly equal (through equal router rows and biases)."""
    tokens: int
    hidden: int
    experts: int
    k: int
    seed: int
    tie: bool = False

    def tensors(self, dtype=torch.float64, device="cpu"):
        g = _gen(self.seed)
        h = _randn(g, self.tokens, self.hidden)
        w = _randn(g, self.experts, self.hidden, std=self.hidden ** -0.5)
        b = _randn(g, self.experts, std=0.5)
        if self.tie:  # expert 1 duplicates expert 0, exactly: tied logits on every row
            w[1], b[1] = w[0], b[0]
        return tuple(t.to(device=device, dtype=dtype) for t in (h, w, b))

    def experts_tensors(self, dtype=torch.float64, device="cpu", inter: int = 32):
        """Small expert weights so the routing can be read through the whole `moe` signature."""
        g = _gen(self.seed + 1)
        gu = _randn(g, self.experts, self.hidden, 2 * inter, std=self.hidden ** -0.5)
        gub = _randn(g, self.experts, 2 * inter)
        dn = _randn(g, self.experts, inter, self.hidden, std=inter ** -0.5)
        dnb = _randn(g, self.experts, self.hidden)
        return tuple(t.to(device=device, dtype=dtype) for t in (gu, gub, dn, dnb))


@st.composite
def route_cases(draw, *, tiny=False, tie=False) -> RouteCase:
    experts = draw(st.sampled_from([4, 8] if tiny else [2, 4, 8, 32]))
    return RouteCase(tokens=draw(st.integers(1, 4 if tiny else 24)),
                     hidden=32 if tiny else draw(st.sampled_from([32, 64])), experts=experts,
                     k=draw(st.integers(1, experts)), seed=draw(st.integers(0, 2 ** 31 - 1)), tie=tie)


# ---- RMSNorm -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NormCase:
    tokens: int
    hidden: int
    scale: float  # the c > 0 of the scale law
    magnitude: float  # typical |x|
    seed: int

    def tensors(self, dtype=torch.float64):
        g = _gen(self.seed)
        x = _randn(g, self.tokens, self.hidden, std=self.magnitude)
        w = _randn(g, self.hidden, std=0.2) + 1.0
        return x.to(dtype), w.to(torch.bfloat16).to(dtype)


@st.composite
def norm_cases(draw) -> NormCase:
    return NormCase(tokens=draw(st.integers(1, 8)), hidden=draw(st.sampled_from([16, 64, 96, 2880])),
                    scale=2.0 ** draw(st.floats(-10, 10)), magnitude=2.0 ** draw(st.floats(-4, 4)),
                    seed=draw(st.integers(0, 2 ** 31 - 1)))


# ---- MXFP4 -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Mxfp4Case:
    """Checkpoint-layout shapes [E, out, in/32, 16]; exponents in [127 + lo, 127 + hi]."""
    experts: int
    rows: int
    groups: int
    exp_lo: int
    exp_hi: int
    seed: int

    def blocks_scales(self):
        g = _gen(self.seed)
        blocks = torch.randint(0, 256, (self.experts, self.rows, self.groups, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(127 + self.exp_lo, 127 + self.exp_hi + 1, (self.experts, self.rows, self.groups),
                               generator=g).to(torch.uint8)
        return blocks, scales

    def dense(self) -> torch.Tensor:
        """Generic float32 values [E, rows, groups·32] spanning several binades per block."""
        g = _gen(self.seed)
        mag = torch.exp2(torch.empty(self.experts, self.rows, self.groups * 32).uniform_(
            self.exp_lo, self.exp_hi, generator=g))
        sign = torch.where(torch.rand(mag.shape, generator=g) < 0.5, -1.0, 1.0)
        return (mag * sign).float()


@st.composite
def mxfp4_cases(draw) -> Mxfp4Case:
    lo = draw(st.integers(-20, 20))
    return Mxfp4Case(experts=draw(st.integers(1, 3)), rows=draw(st.integers(1, 5)),
                     groups=draw(st.integers(1, 3)), exp_lo=lo, exp_hi=lo + draw(st.integers(0, 6)),
                     seed=draw(st.integers(0, 2 ** 31 - 1)))


# ---- whole model -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def tiny_weights(num_layers: int, seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The tiny preset's random weights (they do not depend on the window), cached per process."""
    return random_weights(TINY.replace(num_layers=num_layers), seed, "typical", dtype)


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A tiny model with `layers` layers (even ones sliding over `window`), `batch` rows of `seq`
    tokens, and `splits`: the chunk boundaries of a cached prefill before one-token decoding."""
    layers: int
    window: int
    batch: int
    seq: int
    splits: tuple[int, ...]
    decode: int
    start: int
    seed: int

    @property
    def spec(self) -> ModelSpec:
        return TINY.replace(num_layers=self.layers, sliding_window=self.window)

    def ids(self, batch: int | None = None, seed_offset: int = 0) -> torch.Tensor:
        g = _gen(self.seed + seed_offset)
        return torch.randint(0, TINY.vocab_size, (batch or self.batch, self.seq + self.decode), generator=g)


@st.composite
def model_cases(draw, *, max_seq=24) -> ModelCase:
    seq = draw(st.integers(1, max_seq))
    cuts = draw(st.lists(st.integers(1, seq - 1), max_size=3, unique=True)) if seq > 1 else []
    return ModelCase(layers=draw(st.sampled_from([2, 3])), window=draw(st.integers(1, 10)),
                     batch=draw(st.integers(1, 3)), seq=seq, splits=tuple(sorted(cuts)),
                     decode=draw(st.integers(0, 4)), start=draw(st.sampled_from([0, 0, 5, 4093])),
                     seed=draw(st.integers(0, 3)))
