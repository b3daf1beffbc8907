"""Laws of the clamped SwiGLU (docs/numerics.md §1, docs/numerics.md §6): gate = even columns, clamped from above only;
up = odd columns, clamped on both sides, then +1; out = gate·σ(α·gate)·(up + 1).

The reference is checked through `model/moe.py: swiglu`. A fused MoE is checked through its whole
`moe` signature, arranged so that its output *is* the activation: one expert chosen with weight 1,
`gate_up` the identity, `down` the identity on the first I columns, every bias zero (all of which
are exact in any dtype).
"""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.model import moe as moe_ref

from .backends import moe_backends, params, run_law
from .numerics import assert_close
from .strategies import SwigluCase, swiglu_cases

BACKENDS = moe_backends()


def swiglu_through_moe(moe_fn, experts: int = 4):
    """An activation function (gate_up [T, 2I], alpha, limit) computed by a whole MoE layer."""
    def swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
        t, two_i = gate_up.shape
        inter = two_i // 2
        like = dict(dtype=gate_up.dtype, device=gate_up.device)
        router_w = torch.zeros(experts, two_i, **like)
        router_b = torch.zeros(experts, **like)
        router_b[0] = 1.0  # expert 0 wins every token; k = 1, so its weight is exactly 1
        gu = torch.zeros(experts, two_i, two_i, **like)
        gu[0] = torch.eye(two_i, **like)
        dn = torch.zeros(experts, inter, two_i, **like)
        dn[0, :, :inter] = torch.eye(inter, **like)
        out, _, idx, _ = moe_fn(gate_up, router_w, router_b, gu, torch.zeros(experts, two_i, **like), dn,
                                torch.zeros(experts, two_i, **like), k=1, alpha=alpha, limit=limit)
        assert (idx == 0).all(), "the identity MoE must route every token to expert 0"
        return out[:, :inter]
    return swiglu


def _impl(backend):
    return moe_ref.swiglu if backend.name == "reference" else swiglu_through_moe(backend.fn)


def formula(gate: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """g·σ(α·g)·(u + 1) in float64, no clamp: the caller decides what the clamp does."""
    gate, up = gate.double(), up.double()
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def _run(swiglu, case: SwigluCase, dtype, device):
    x = case.gate_up(dtype, device)
    out = swiglu(x, case.alpha, case.limit).double().cpu()
    x = x.double().cpu()
    return x[:, 0::2], x[:, 1::2], out


def _compare_where(region, out, want, dtype, what):
    if region.any():
        assert_close(out[region], want[region], dtype, what, scale=want.abs().max().item())


def check_gate_clamped_from_above_only(swiglu, case: SwigluCase, dtype=torch.float64, device="cpu"):
    """A gate above the limit acts as the limit; a gate below −limit is left alone."""
    g, u, out = _run(swiglu, case, dtype, device)
    lim = case.limit
    cu = u.clamp(-lim, lim)
    _compare_where(g > lim, out, formula(torch.full_like(g, lim), cu, case.alpha), dtype, "gate > limit")
    _compare_where(g < -lim, out, formula(g, cu, case.alpha), dtype, "gate < −limit (not clamped)")
    return True


def check_up_clamped_both_sides(swiglu, case: SwigluCase, dtype=torch.float64, device="cpu"):
    """An up value beyond ±limit acts as ±limit (then +1)."""
    g, u, out = _run(swiglu, case, dtype, device)
    lim = case.limit
    _compare_where(u.abs() > lim, out, formula(g.clamp(max=lim), u.sign() * lim, case.alpha), dtype,
                   "|up| > limit")
    return True


def check_identity_inside_box(swiglu, case: SwigluCase, dtype=torch.float64, device="cpu"):
    """Inside |gate|, |up| ≤ limit the clamp does nothing: out = g·σ(αg)·(u + 1)."""
    g, u, out = _run(swiglu, case, dtype, device)
    lim = case.limit
    _compare_where((g.abs() <= lim) & (u.abs() <= lim), out, formula(g, u, case.alpha), dtype, "inside the box")
    return True


def check_continuous_at_boundaries(swiglu, case: SwigluCase, dtype=torch.float64, device="cpu"):
    """Stepping across gate = limit, up = −limit or up = +limit by 2ε moves the output by O(ε)."""
    lim, alpha, eps = case.limit, case.alpha, 1e-6 * case.limit
    g = torch.Generator().manual_seed(case.seed)
    other = (torch.rand(case.tokens * 4, generator=g, dtype=torch.float64) * 2 - 1) * lim
    rows = []
    for edge in (lim, -lim):
        for s in (-eps, eps):
            rows.append(torch.stack([other, torch.full_like(other, edge + s)], -1))  # up crosses ±limit
    for s in (-eps, eps):
        rows.append(torch.stack([torch.full_like(other, lim + s), other], -1))  # gate crosses +limit
    x = torch.stack(rows, 1).flatten(1)  # [n, 6 pairs · 2]: pairs (gate, up) interleaved
    out = swiglu(x.to(device=device, dtype=dtype), alpha, lim).double().cpu()
    # |∂out/∂g| ≤ (1 + α|g|/4)(|u| + 1), |∂out/∂u| ≤ |g|: a Lipschitz bound over the box's surface
    lip = (1 + alpha * lim / 4 + 1) * (lim + 1) + lim
    jumps = (out[:, 1::2] - out[:, 0::2]).abs().max().item()
    assert jumps <= 2 * eps * lip * 1.01 + 1e-12, f"output jumps by {jumps:.3e} across a clamp boundary"
    return True


def check_interleave(swiglu, case: SwigluCase, dtype=torch.float64, device="cpu"):
    """Gate and up are the even and odd columns; reading them as halves gives another answer."""
    x = case.gate_up(dtype, device)
    out = swiglu(x, case.alpha, case.limit).double().cpu()
    x = x.double().cpu()
    lim = case.limit

    def clamped(gate, up):
        return formula(gate.clamp(max=lim), up.clamp(-lim, lim), case.alpha)
    assert_close(out, clamped(x[:, 0::2], x[:, 1::2]), dtype, "even/odd interleave")
    halves = clamped(*x.chunk(2, dim=-1))
    assert (out - halves).abs().max() > 1e-3 * max(1.0, halves.abs().max().item()), \
        "the half-split layout gives the same answer: the test input is not generic"
    return True


LAWS = [check_gate_clamped_from_above_only, check_up_clamped_both_sides, check_identity_inside_box,
        check_continuous_at_boundaries, check_interleave]


@pytest.mark.parametrize("law", LAWS, ids=lambda f: f.__name__[6:])
@pytest.mark.parametrize("backend", params(BACKENDS))
def test_swiglu_law(backend, law):
    run_law(law, _impl(backend), swiglu_cases(tiny=backend.name != "reference"), 25, backend,
            dtype=backend.precise, device=backend.device)


@pytest.mark.parametrize("backend,dtype", [pytest.param(b, d, id=f"{b.name}-{str(d)[6:]}")
                                           for b in BACKENDS for d in b.dtypes[1:]])
def test_swiglu_low_precision(backend, dtype):
    """The clamp laws in the narrower dtypes too (the continuity law needs a fine ε: precise dtype only)."""
    for law in (check_gate_clamped_from_above_only, check_up_clamped_both_sides, check_identity_inside_box):
        run_law(law, _impl(backend), swiglu_cases(tiny=backend.name != "reference"), 10, backend,
                dtype=dtype, device=backend.device)
