"""Laws of YaRN RoPE (docs/numerics.md §4): the inverse frequencies, the concentration, the
half-split rotation and the relative-position property.

Each check takes the rope module (`inv_freq`, `cos_sin`, `apply_rope`, `correction_range`), so a
mutant is the module with one of them replaced.
"""
from __future__ import annotations

import math

import torch
from gptoss_verify.config import ModelSpec, preset
from gptoss_verify.model import rope

from .backends import run_law
from .strategies import RopeCase, rope_cases, yarn_specs


def closed_form(spec: ModelSpec, truncate: bool | None = None) -> tuple[list[float], list[float]]:
    """(inv_freq, ramp) from docs/numerics.md §4 in Python floats: extrap = θ^(−2i/D), interp = extrap/factor,
    ramp = clamp((i − low)/(high − low), 0, 1) over the correction range (floor/ceil when
    truncating, clipped to [0, D − 1]; a degenerate range gets high += 0.001 as in transformers)."""
    d, theta = spec.head_dim, spec.rope_theta
    extrap = [theta ** (-2 * i / d) for i in range(d // 2)]
    if spec.rope_factor == 1.0:
        return extrap, [0.0] * (d // 2)

    def dim(rotations):
        return d * math.log(spec.rope_original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim(spec.rope_beta_fast), dim(spec.rope_beta_slow)
    if spec.rope_truncate if truncate is None else truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0.0), min(high, d - 1.0)
    if low == high:
        high += 0.001
    ramp = [min(1.0, max(0.0, (i - low) / (high - low))) for i in range(d // 2)]
    return [e / spec.rope_factor * r + e * (1 - r) for e, r in zip(extrap, ramp)], ramp


def check_inv_freq_closed_form(rope_mod, spec: ModelSpec):
    """inv_freq (float64) equals the closed form."""
    got = rope_mod.inv_freq(spec, torch.float64)
    want = torch.tensor(closed_form(spec)[0], dtype=torch.float64)
    err = ((got - want).abs() / want).max().item()
    assert err <= 1e-13, f"inv_freq vs closed form: relative error {err:.2e} ({spec})"
    return True


ANCHORS_INV_FREQ = {1: 0.6890443, 8: 0.05081327, 9: 0.03170570, 12: 0.006794959, 17: 1.2931869e-4,
                    18: 3.830881e-5, 31: 3.0235114e-7}
ANCHORS_COS = {1: (0.7275569, 1.0393581), 4096: (1.0826325, 0.5188683)}
ANCHOR_RANGE = (8.092779115512402, 17.39802450158856)


def check_spec_anchors(rope_mod, spec: ModelSpec):
    """docs/numerics.md §4's published numbers for gpt-oss: the correction range, inv_freq and cos (fp32)."""
    low, high = rope_mod.correction_range(spec)
    assert abs(low - ANCHOR_RANGE[0]) < 1e-12 and abs(high - ANCHOR_RANGE[1]) < 1e-12, \
        f"correction range {(low, high)} != {ANCHOR_RANGE}"
    inv = rope_mod.inv_freq(spec, torch.float32)
    for i, want in ANCHORS_INV_FREQ.items():
        assert abs(inv[i].item() - want) <= 1e-6 * want, f"inv_freq[{i}] = {inv[i].item()!r}, docs/numerics.md §4 says {want}"
    cos, _ = rope_mod.cos_sin(spec, torch.tensor(list(ANCHORS_COS)), torch.float32)
    for row, (pos, want) in enumerate(ANCHORS_COS.items()):
        got = cos[row, :2].tolist()
        assert all(abs(g - w) <= 2e-6 * abs(w) for g, w in zip(got, want)), f"cos at {pos} = {got}, docs/numerics.md §4 says {want}"
    return True


def check_factor_one_is_plain_rope(rope_mod, case: RopeCase):
    """With factor 1, inv_freq = θ^(−2i/D) and cos/sin are unscaled cos/sin of position·inv_freq."""
    spec = case.spec.replace(rope_factor=1.0)
    d = spec.head_dim
    plain = torch.tensor([spec.rope_theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    got = rope_mod.inv_freq(spec, torch.float64)
    err = ((got - plain).abs() / plain).max().item()
    assert err <= 1e-13, f"factor 1: inv_freq differs from θ^(−2i/D) by {err:.2e}"
    pos = torch.tensor(case.positions)
    cos, sin = rope_mod.cos_sin(spec, pos, torch.float64, angle_dtype=torch.float64)
    angle = pos.double()[:, None] * plain
    tol = 1e-15 * (1 + pos.max().item())
    assert (cos - angle.cos()).abs().max() <= tol and (sin - angle.sin()).abs().max() <= tol, \
        "factor 1: cos/sin are not plain RoPE (a concentration ≠ 1, or other frequencies)"
    return True


def check_truncate_moves_exactly(rope_mod, spec: ModelSpec):
    """truncate=True differs from False exactly at the indices whose ramp the rounded range moves."""
    a = rope_mod.inv_freq(spec, torch.float64, truncate=False)
    b = rope_mod.inv_freq(spec, torch.float64, truncate=True)
    ramp_f, ramp_t = closed_form(spec, False)[1], closed_form(spec, True)[1]
    want = [rf != rt for rf, rt in zip(ramp_f, ramp_t)]
    got = (a != b).tolist()
    assert got == want, (f"truncate changes indices {[i for i, x in enumerate(got) if x]}, the rounded range "
                         f"moves {[i for i, x in enumerate(want) if x]} ({spec})")
    return True


def check_inv_freq_decreasing(rope_mod, spec: ModelSpec):
    """inv_freq is strictly decreasing over the frequency index."""
    inv = rope_mod.inv_freq(spec, torch.float64)
    bad = (inv[1:] >= inv[:-1]).nonzero().flatten().tolist()
    assert not bad, f"inv_freq not decreasing at indices {bad} ({spec})"
    return True


def _q_k(case: RopeCase):
    g = torch.Generator().manual_seed(case.seed)
    return (torch.randn(case.spec.head_dim, generator=g, dtype=torch.float64),
            torch.randn(case.spec.head_dim, generator=g, dtype=torch.float64))


def _rotate(rope_mod, spec, x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """x [D] at each position -> [len(positions), D], float64 angles."""
    cos, sin = rope_mod.cos_sin(spec, torch.tensor(positions), torch.float64, angle_dtype=torch.float64)
    return rope_mod.apply_rope(x.expand(len(positions), 1, -1), cos, sin)[:, 0]


def check_rotation_scales_pairs(rope_mod, case: RopeCase):
    """Every pair (d, d + D/2) has its norm multiplied by exactly the concentration 0.1·ln(factor) + 1."""
    spec = case.spec
    x, _ = _q_k(case)
    y = _rotate(rope_mod, spec, x, list(case.positions))
    half = spec.head_dim // 2
    before = torch.hypot(x[:half], x[half:])
    after = torch.hypot(y[:, :half], y[:, half:])
    c = 0.1 * math.log(spec.rope_factor) + 1 if spec.rope_factor > 1 else 1.0
    err = ((after - c * before).abs() / (c * before)).max().item()
    assert err <= 1e-13, f"pair norms scaled by ≠ {c}: relative error {err:.2e} ({spec})"
    return True


def check_relative_position(rope_mod, case: RopeCase):
    """⟨rope(q, m), rope(k, n)⟩ depends only on m − n: shifting both positions by t changes nothing."""
    spec = case.spec
    q, k = _q_k(case)
    pos = list(case.positions)
    moved = [p + case.shift for p in pos]
    rq, rk = _rotate(rope_mod, spec, q, pos), _rotate(rope_mod, spec, k, pos)
    mq, mk = _rotate(rope_mod, spec, q, moved), _rotate(rope_mod, spec, k, moved)
    before, after = rq @ rk.T, mq @ mk.T  # [m, n] over all pairs of positions
    scale = q.norm().item() * k.norm().item() * spec.concentration ** 2
    err = (before - after).abs().max().item()
    assert err <= 1e-9 * scale, f"⟨rope(q,m), rope(k,n)⟩ moved by {err:.2e} under a shift of {case.shift}"
    return True


def test_inv_freq_closed_form():
    run_law(check_inv_freq_closed_form, rope, yarn_specs(), 50)


def test_spec_anchors():
    assert check_spec_anchors(rope, preset("gpt-oss-20b"))


def test_factor_one_is_plain_rope():
    run_law(check_factor_one_is_plain_rope, rope, rope_cases(), 25)


def test_truncate_moves_exactly():
    run_law(check_truncate_moves_exactly, rope, yarn_specs(scaled=True), 50)


def test_inv_freq_decreasing():
    run_law(check_inv_freq_decreasing, rope, yarn_specs(), 50)


def test_rotation_scales_pairs():
    run_law(check_rotation_scales_pairs, rope, rope_cases(), 50)


def test_relative_position():
    run_law(check_relative_position, rope, rope_cases(), 50)


def test_relative_position_at_the_published_config():
    run_law(check_relative_position, rope, rope_cases(spec=preset("gpt-oss-20b")), 25)
