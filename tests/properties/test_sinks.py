"""Laws of the attention sink (docs/numerics.md §1, docs/numerics.md §3): one extra, unscaled logit per query head, inside
the softmax and its max, with no value row.

Each law is a `check_<law>(attn, case, dtype)` on an attention function with the signature of
`model/attention.py: attention`, held against every backend in `backends.attention_backends()`.
"""
from __future__ import annotations

import math

import pytest
import torch

from .backends import attention_backends, params, run_law
from .numerics import assert_close, law_tolerance
from .strategies import AttnCase, attn_cases, dense_attention, law_mask

BACKENDS = attention_backends()


def _cases(backend, **kw):
    return attn_cases(tiny=backend.name != "reference", **kw)


def _causal_softmax(case: AttnCase, q, k, v):
    """Plain (windowed) causal softmax attention, no sink, in float64."""
    _, _, scores, _ = dense_attention(case, q, k, v, torch.zeros(case.heads, dtype=torch.float64))
    kv = torch.arange(case.heads) // case.group
    plain = torch.softmax(scores.masked_fill(~law_mask(case), -math.inf), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", plain, v.double()[:, :, kv])


def check_neg_inf_sink_is_causal_softmax(attn, case: AttnCase, dtype=torch.float64, device="cpu"):
    """A sink of −∞ gives plain causal softmax attention."""
    q, k, v, sinks = case.tensors(dtype, device)
    out = attn(q, k, v, torch.full_like(sinks, -math.inf), **case.kwargs())
    assert_close(out, _causal_softmax(case, q.cpu(), k.cpu(), v.cpu()), dtype, "sink −∞ vs causal softmax")
    return True


def _row_factor(case: AttnCase, q, k, v, sinks) -> torch.Tensor:
    """Σe^s / (Σe^s + e^sink) per (batch, query, head), from float64 scores: [B, Sq, Hq, 1]."""
    probs, p_sink, _, _ = dense_attention(case, q, k, v, sinks)
    return (1 - p_sink).permute(0, 2, 1)[..., None]


def check_sink_rescales_rows(attn, case: AttnCase, dtype=torch.float64, device="cpu"):
    """Row-wise: output with the sink = output without it × Σe^s / (Σe^s + e^sink)."""
    q, k, v, sinks = case.tensors(dtype, device)
    with_sink = attn(q, k, v, sinks, **case.kwargs())
    without = attn(q, k, v, torch.full_like(sinks, -math.inf), **case.kwargs())
    expected = without.double().cpu() * _row_factor(case, q.cpu(), k.cpu(), v.cpu(), sinks.cpu())
    assert_close(with_sink, expected, dtype, "output with sink vs without × factor",
                 scale=v.abs().max().item())
    return True


def check_probabilities_sum_to_one_minus_sink(attn, case: AttnCase, dtype=torch.float64, device="cpu"):
    """With every value row equal to 1 the output is Σ_j p_ij, which must be 1 − p_sink(i)."""
    q, k, v, sinks = case.tensors(dtype, device)
    out = attn(q, k, torch.ones_like(v), sinks, **case.kwargs())
    expected = _row_factor(case, q.cpu(), k.cpu(), v.cpu(), sinks.cpu()).expand(-1, -1, -1, case.head_dim)
    assert_close(out, expected, dtype, "Σ probabilities vs 1 − p_sink", scale=1.0)
    return True


def check_shift_invariance(attn, case: AttnCase, dtype=torch.float64, device="cpu"):
    """Adding one constant to every score of a head and to its sink changes nothing.

    The constant enters through a key dimension held at κ = 1 on every key: adding δ_h to that
    dimension of head h's queries adds δ_h/√D to each of its scores; the sink gets δ_h/√D too."""
    q, k, v, sinks = (t.double() for t in case.tensors(torch.float64))
    k[..., 0] = 1.0
    delta = torch.linspace(-8.0, 8.0, case.heads, dtype=torch.float64)
    shift = delta / math.sqrt(case.head_dim)
    q2 = q.clone()
    q2[..., 0] += delta
    to = dict(dtype=dtype, device=device)
    base = attn(q.to(**to), k.to(**to), v.to(**to), sinks.to(**to), **case.kwargs())
    moved = attn(q2.to(**to), k.to(**to), v.to(**to), (sinks + shift).to(**to), **case.kwargs())
    # the inputs themselves are rounded to dtype, so the comparison carries the dtype's tolerance
    assert_close(moved, base.double(), dtype, "shifted scores and sink vs original",
                 scale=4 * v.abs().max().item())
    return True


def check_sink_gradient(attn, case: AttnCase, dtype=torch.float64, device="cpu"):
    """d⟨O, dO⟩/d sink_h = −Σ_i p_sink(i)·⟨o_i, dO_i⟩ over head h's queries (and the batch),
    against autograd through the implementation."""
    q, k, v, sinks = case.tensors(dtype, device)
    sinks = sinks.clone().requires_grad_(True)
    out = attn(q, k, v, sinks, **case.kwargs())
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64)
    (out * d_out.to(out)).sum().backward()
    _, p_sink, _, _ = dense_attention(case, q.cpu(), k.cpu(), v.cpu(), sinks.detach().cpu())
    o = out.detach().double().cpu()
    inner = (o * d_out).sum(-1).permute(0, 2, 1)  # [B, Hq, Sq]
    expected = -(p_sink * inner).sum(dim=(0, 2))
    assert sinks.grad is not None, "no gradient reached the sinks"
    assert_close(sinks.grad, expected, dtype, "sink gradient vs −Σ p_sink⟨o, dO⟩")
    return True


HUGE = 30.0


def check_huge_sinks_finite(attn, case: AttnCase, dtype=torch.float64, device="cpu"):
    """Sinks of ±30 with scores of the same size stay finite in every dtype, and near the float64
    truth on the same (rounded) inputs."""
    q, k, v, sinks = case.tensors(dtype, device)
    first = HUGE if case.seed % 2 == 0 else -HUGE  # alternate ±30 over the heads
    sinks = torch.tensor([first * (-1) ** h for h in range(case.heads)], dtype=dtype, device=device)
    out = attn(q, k, v, sinks, **case.kwargs())
    assert torch.isfinite(out).all(), f"non-finite output with sinks ±{HUGE} in {dtype}"
    _, _, scores, truth = dense_attention(case, q.cpu(), k.cpu(), v.cpu(), sinks.cpu())
    # a low-precision score carries an absolute error ≈ eps·|s|, which moves the probabilities by as much
    spread = 1.0 + max(HUGE, scores.abs().max().item())
    err = (out.double().cpu() - truth).abs().max().item()
    bound = 4 * law_tolerance(dtype) * spread * v.abs().max().item()
    assert err <= bound, f"huge sinks: error {err:.3e} > {bound:.3e} in {dtype}"
    return True


@pytest.mark.parametrize("backend", params(BACKENDS))
def test_neg_inf_sink_is_causal_softmax(backend):
    run_law(check_neg_inf_sink_is_causal_softmax, backend.fn, _cases(backend), 25, backend,
            dtype=backend.precise, device=backend.device)


@pytest.mark.parametrize("backend", params(BACKENDS))
def test_sink_rescales_rows(backend):
    run_law(check_sink_rescales_rows, backend.fn, _cases(backend), 25, backend,
            dtype=backend.precise, device=backend.device)


@pytest.mark.parametrize("backend", params(BACKENDS))
def test_probabilities_sum_to_one_minus_sink(backend):
    run_law(check_probabilities_sum_to_one_minus_sink, backend.fn, _cases(backend), 25, backend,
            dtype=backend.precise, device=backend.device)


@pytest.mark.parametrize("backend", params(BACKENDS))
def test_shift_invariance(backend):
    run_law(check_shift_invariance, backend.fn, _cases(backend), 25, backend,
            dtype=backend.precise, device=backend.device)


@pytest.mark.parametrize("backend", params(BACKENDS))
def test_sink_gradient(backend):
    run_law(check_sink_gradient, backend.fn, _cases(backend), 25, backend,
            dtype=backend.precise, device=backend.device)


@pytest.mark.parametrize("backend,dtype", [pytest.param(b, d, id=f"{b.name}-{str(d)[6:]}")
                                           for b in BACKENDS for d in b.dtypes])
def test_huge_sinks_finite(backend, dtype):
    run_law(check_huge_sinks_finite, backend.fn, _cases(backend, score_scale=12.0), 15, backend,
            dtype=dtype, device=backend.device)
