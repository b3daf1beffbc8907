"""Laws of the MXFP4 codec (docs/layouts.md §3, OCP Microscaling v1.0): the e2m1 table with the low nibble
first, the E8M0 scale biased by 127, exact round trips on the grid, round-to-nearest encoding with
the OCP shared exponent (saturating at ±6·2^e), and the HF orientation of dequantized experts.

Each check takes the codec module (`decode`, `encode`, `to_hf_dense`), so a mutant is the module
with one function or constant replaced.
"""
from __future__ import annotations

import math

import torch

from gptoss_verify.formats import mxfp4

from .backends import run_law
from .strategies import Mxfp4Case, mxfp4_cases

# docs/layouts.md §3, written out here rather than imported: bit 3 is the sign, bits 0..2 the magnitude
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
GRID = sorted({abs(v) for v in E2M1})  # 0, 0.5, 1, 1.5, 2, 3, 4, 6


def element(blocks: torch.Tensor, scales: torch.Tensor, idx: tuple[int, ...], i: int) -> float:
    """Element i (along the packed dimension) of row `idx`, decoded by hand."""
    byte = int(blocks[idx][i // 32][(i % 32) // 2])
    nibble = byte & 0x0F if i % 2 == 0 else byte >> 4
    return math.ldexp(E2M1[nibble], int(scales[idx][i // 32]) - 127)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values and equal signs of zero."""
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def check_byte_table(codec, case: Mxfp4Case):
    """Every element decodes to table[nibble]·2^(scale − 127), element 2b from byte b's low nibble,
    2b + 1 from its high nibble."""
    blocks, scales = case.blocks_scales()
    got = codec.decode(blocks, scales, torch.float32)
    assert got.shape == (case.experts, case.rows, case.groups * 32)
    want = torch.tensor([[[element(blocks, scales, (e, r), i) for i in range(case.groups * 32)]
                          for r in range(case.rows)] for e in range(case.experts)], dtype=torch.float32)
    assert _same(got, want), f"decode differs from the table at {(got != want).nonzero()[:1].tolist()}"
    return True


def check_every_byte_at_scale_127(codec):
    """All 256 bytes at scale 127 (×1): the table itself, low nibble first."""
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)
    got = codec.decode(blocks, torch.full((1, 16), 127, dtype=torch.uint8), torch.float32).flatten()
    want = torch.tensor([E2M1[b & 15] if i % 2 == 0 else E2M1[b >> 4] for b in range(256) for i in range(2)])
    assert _same(got, want), f"byte {int((got != want).nonzero()[0]) // 2} decodes wrong at scale 127"
    return True


def _grid_blocks(case: Mxfp4Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense values on the grid of their own block: table[n]·2^e, e per block, [E, rows, groups·32],
    and the exponents [E, rows, groups]."""
    blocks, scales = case.blocks_scales()
    b = blocks.to(torch.int64)
    nibbles = torch.stack((b & 15, b >> 4), -1).flatten(-2)  # [E, rows, groups, 32]
    exps = scales.to(torch.int64) - 127
    vals = torch.tensor(E2M1, dtype=torch.float64)[nibbles] * torch.exp2(exps.double())[..., None]
    return vals.flatten(-2).float(), exps


def check_grid_round_trip(codec, case: Mxfp4Case):
    """decode(encode(x)) == x for x whose every block lies on the e2m1 grid of one scale."""
    x, _ = _grid_blocks(case)
    back = codec.decode(*codec.encode(x), torch.float32)
    assert torch.equal(back, x), f"round trip changes {int((back != x).sum())} grid values"
    return True


def ocp_exponent(x: torch.Tensor) -> torch.Tensor:
    """Per block of 32: floor(log2(max|x|)) − 2 (emax of e2m1), via frexp; 0 for an all-zero block."""
    amax = x.double().reshape(*x.shape[:-1], -1, 32).abs().amax(-1)
    mant, exp = torch.frexp(amax)  # amax = mant·2^exp, mant in [0.5, 1)
    return torch.where(amax > 0, exp.to(torch.int64) - 1 - 2, torch.zeros_like(exp, dtype=torch.int64))


def _per_element(exps: torch.Tensor) -> torch.Tensor:
    return exps.repeat_interleave(32, dim=-1)


def check_round_to_nearest(codec, case: Mxfp4Case):
    """encode uses the OCP shared exponent e = floor(log2 max|x|) − 2 per block, and every element
    with |x|/2^e ≤ 6 decodes to a nearest e2m1 value times 2^e: the error is at most half the grid
    step there (0.5 below 2, 1 below 4, 2 up to 6, all ×2^e)."""
    x = case.dense()
    blocks, scales = codec.encode(x)
    e = ocp_exponent(x)
    assert torch.equal(scales.to(torch.int64), e + 127), "shared scale is not the OCP exponent"
    y = x.double() / torch.exp2(_per_element(e).double())
    q = codec.decode(blocks, scales, torch.float64) / torch.exp2(_per_element(e).double())
    inside = y.abs() <= 6
    err = (q - y).abs()
    nearest = torch.stack([(y.abs() - g).abs() for g in GRID]).min(0).values
    assert (err[inside] <= nearest[inside]).all(), "an element is not rounded to a nearest grid value"
    step = torch.where(y.abs() < 2, 0.5, torch.where(y.abs() < 4, 1.0, 2.0))
    assert (err[inside] <= step[inside] / 2).all(), "error above half a grid step"
    assert (torch.sign(q[inside & (q != 0)]) == torch.sign(y[inside & (q != 0)])).all(), "sign flipped"
    return True


def check_saturation(codec, case: Mxfp4Case):
    """Elements beyond the grid (|x|/2^e > 6, possible since max|x|/2^e < 8) decode to ±6·2^e."""
    x = case.dense()
    e = _per_element(ocp_exponent(x)).double()
    y = x.double() / torch.exp2(e)
    q = codec.decode(*codec.encode(x), torch.float64)
    over = y.abs() > 6
    want = torch.sign(y) * 6 * torch.exp2(e)
    assert torch.equal(q[over], want[over]), "a saturated element is not clamped to ±6·2^e"
    return True


def dense_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Checkpoint [E, out, in/32, 16] -> the HF module's [E, in, out], element by element."""
    experts, rows, groups = scales.shape
    out = torch.empty(experts, groups * 32, rows, dtype=torch.float32)
    for e in range(experts):
        for o in range(rows):
            for i in range(groups * 32):
                out[e, i, o] = element(blocks, scales, (e, o), i)
    return out


def check_hf_orientation(codec, case: Mxfp4Case):
    """to_hf_dense(blocks, scales)[e, i, o] is input i of output row o, on non-square shapes."""
    blocks, scales = case.blocks_scales()
    got = codec.to_hf_dense(blocks, scales, torch.float32)
    want = dense_reference(blocks, scales)
    assert got.shape == want.shape, f"HF dense shape {list(got.shape)} != {list(want.shape)}"
    assert _same(got, want), "HF dense orientation differs from the element-wise reference"
    return True


def test_byte_table():
    run_law(check_byte_table, mxfp4, mxfp4_cases(), 25)


def test_every_byte_at_scale_127():
    assert check_every_byte_at_scale_127(mxfp4)


def test_grid_round_trip():
    run_law(check_grid_round_trip, mxfp4, mxfp4_cases(), 50)


def test_round_to_nearest():
    run_law(check_round_to_nearest, mxfp4, mxfp4_cases(), 50)


def test_saturation():
    run_law(check_saturation, mxfp4, mxfp4_cases(), 50)


def test_hf_orientation():
    run_law(check_hf_orientation, mxfp4, mxfp4_cases(), 15)
