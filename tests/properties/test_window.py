"""Laws of the sliding window (docs/numerics.md §2): key j is visible from query i iff i − W < j ≤ i (W keys,
the query's own included); a window covering the sequence is plain causal attention; even layers
slide, odd ones are full; a cached, chunked prefill and decoding equal the full forward.

Visibility is read through the attention function itself: with value rows one-hot per key
(D ≥ number of keys), the output row of a query *is* its probability row.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import strategies as st

from gptoss_verify.model import REFERENCE, Transformer
from gptoss_verify.model.attention import visible

from .backends import attention_backends, model_backends, model_blocks, params, run_law
from .numerics import assert_close
from .strategies import AttnCase, ModelCase, attn_cases, law_mask, model_cases, tiny_weights

BACKENDS = attention_backends()


def _cases(backend, **kw):
    return attn_cases(tiny=backend.name != "reference", **kw)


def probabilities(attn, case: AttnCase, dtype, device) -> torch.Tensor:
    """[B, Sq, Hq, Sk]: each query's attention probabilities, read through one-hot value rows."""
    q, k, _, sinks = case.tensors(dtype, device)
    eye = torch.eye(case.sk, case.head_dim, dtype=dtype, device=device)
    v = eye[None, :, None, :].expand(case.batch, case.sk, case.kv_heads, case.head_dim).contiguous()
    return attn(q, k, v, sinks, **case.kwargs())[..., :case.sk]


# ---- visibility --------------------------------------------------------------------------------
def check_visible_fn(visible_fn, ijw: tuple[int, int, int | None]):
    """`visible(i, j, W)` is exactly i − W < j ≤ i (j ≤ i without a window), for any integers."""
    i, j, w = ijw
    got = bool(visible_fn(torch.tensor([i]), torch.tensor([j]), w)[0, 0])
    want = j <= i and (w is None or i - w < j)
    assert got == want, f"visible({i}, {j}, {w}) = {got}, law says {want}"
    return True


def check_visibility_in_attention(attn, case: AttnCase, dtype=torch.float64, device="cpu"):
    """A key gets a non-zero probability iff the law makes it visible."""
    seen = probabilities(attn, case, dtype, device).cpu() != 0
    law = law_mask(case)[None, :, None, :].expand_as(seen)
    bad = (seen != law).nonzero()
    assert not len(bad), (f"visibility differs from i − W < j ≤ i at [b, query, head, key] = "
                          f"{bad[0].tolist()} (sees it: {bool(seen[tuple(bad[0])])})")
    return True


def check_window_covering_is_causal(attn, case: AttnCase, dtype=torch.float64, device="cpu"):
    """A window at least as long as the key span changes nothing against full causal attention."""
    assert case.window is not None and case.window >= case.sk
    q, k, v, sinks = case.tensors(dtype, device)
    windowed = attn(q, k, v, sinks, **case.kwargs())
    full = attn(q, k, v, sinks, **dict(case.kwargs(), window=None))
    assert_close(windowed, full, dtype, f"window {case.window} >= {case.sk} keys vs full causal")
    return True


def check_keys_per_query(attn, case: AttnCase, dtype=torch.float64, device="cpu"):
    """With keys from position 0, the query at position i sees min(i + 1, W) keys."""
    assert case.k_start == 0
    count = (probabilities(attn, case, dtype, device).cpu() != 0).sum(-1)  # [B, Sq, Hq]
    pos = torch.arange(case.sq) + case.q_start
    want = (pos + 1) if case.window is None else torch.clamp(pos + 1, max=case.window)
    bad = (count != want[None, :, None]).nonzero()
    assert not len(bad), (f"query at position {int(pos[bad[0][1]])} sees {int(count[tuple(bad[0])])} keys, "
                          f"law says {int(want[bad[0][1]])} (W = {case.window})")
    return True


# ---- the model: layer pattern and the cache ----------------------------------------------------
def _model(case: ModelCase, backend: str = "reference", dtype=torch.float64, device="cpu") -> Transformer:
    weights = {n: t.to(device) for n, t in tiny_weights(case.layers, case.seed, dtype).items()}
    return Transformer.from_state_dict(case.spec, weights, model_blocks(backend))


def check_layer_pattern(model_cls, case: ModelCase):
    """Layers 0, 2, 4, … slide over W keys, odd layers are full causal: in the spec, in the cache
    and in the window each layer's attention is actually called with."""
    spec = case.spec
    model = model_cls.from_state_dict(spec, tiny_weights(case.layers, case.seed))
    windows = []

    def record(q, k, v, sinks, *, window, q_start, k_start):
        windows.append(window)
        return torch.zeros_like(q)
    h = torch.zeros(1, 2, spec.hidden_size, dtype=torch.float64)
    cos, sin = model.rope_tables(0, 2, "cpu")
    for layer in model.model.layers:
        layer.self_attn(h, cos, sin, 0, None, REFERENCE.replace(attention=record), None)
    law = [spec.sliding_window if i % 2 == 0 else None for i in range(spec.num_layers)]
    assert [spec.is_sliding(i) for i in range(spec.num_layers)] == [i % 2 == 0 for i in range(spec.num_layers)], \
        "is_sliding: even layers must slide"
    assert [c.window for c in model.new_cache()] == law, "new_cache: windows per layer"
    assert windows == law, f"attention called with windows {windows}, law says {law}"
    return True


def check_chunked_prefill_then_decode(backend: str, case: ModelCase, dtype=torch.float64, device="cpu"):
    """Prefill in chunks at `case.splits` through the cache, then decode one token at a time: the
    logits equal the full forward's; sliding layers' caches never hold more than W keys, full
    layers' hold every token so far."""
    model = _model(case, backend, dtype, device)
    ids = case.ids().to(device)
    with torch.no_grad():
        full = model(ids, case.start)
        cache = model.new_cache()
        bounds = [0, *case.splits, case.seq] + list(range(case.seq + 1, case.seq + case.decode + 1))
        parts = []
        for a, b in zip(bounds, bounds[1:]):
            parts.append(model(ids[:, a:b], case.start + a, cache))
            for i, layer in enumerate(cache):
                if case.spec.is_sliding(i):
                    assert layer.length <= case.window, f"layer {i} caches {layer.length} > W = {case.window}"
                else:
                    assert layer.length == b, f"full layer {i} caches {layer.length} of {b} tokens"
    assert_close(torch.cat(parts, 1), full, dtype, f"chunks {bounds} vs full forward")
    return True


@st.composite
def ijw(draw):
    """(i, j, W): any positions, with j often within two of an edge of the window (i − W, i)."""
    i = draw(st.integers(-5, 1 << 20))
    w = draw(st.none() | st.integers(1, 300))
    edge = draw(st.sampled_from([i, i - (w or 0)]))
    j = draw(st.integers(edge - 2, edge + 2) | st.integers(i - 310, i + 3) | st.integers(-5, 1 << 20))
    return (i, j, w)


def test_visible_fn():
    run_law(check_visible_fn, visible, ijw(), 200)


@pytest.mark.parametrize("backend", params(BACKENDS))
def test_visibility_in_attention(backend):
    run_law(check_visibility_in_attention, backend.fn, _cases(backend, sink_scale=0.5), 30, backend,
            dtype=backend.precise, device=backend.device)


def covering_windows(base):
    """Cases whose window is the key span plus 0..3."""
    return st.tuples(base, st.integers(0, 3)).map(lambda t: dataclasses.replace(t[0], window=t[0].sk + t[1]))


def from_position_zero(base):
    return base.map(lambda c: dataclasses.replace(c, q_start=c.prefix))


@pytest.mark.parametrize("backend", params(BACKENDS))
def test_window_covering_is_causal(backend):
    run_law(check_window_covering_is_causal, backend.fn, covering_windows(_cases(backend)), 25, backend,
            dtype=backend.precise, device=backend.device)


@pytest.mark.parametrize("backend", params(BACKENDS))
def test_keys_per_query(backend):
    run_law(check_keys_per_query, backend.fn, from_position_zero(_cases(backend, sink_scale=0.5)), 30, backend,
            dtype=backend.precise, device=backend.device)


def test_layer_pattern():
    run_law(check_layer_pattern, Transformer, model_cases(), 10)


@pytest.mark.parametrize("backend", params(model_backends()))
def test_chunked_prefill_then_decode(backend):
    run_law(check_chunked_prefill_then_decode, backend.fn, model_cases(), 25, backend,
            dtype=backend.precise, device=backend.device)
