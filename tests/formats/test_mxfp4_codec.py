"""The fast MXFP4 codec against slow, obviously-correct versions written out here from docs/layouts.md §3
and the OCP MX v1.0 rule, in plain Python arithmetic (no lookup tables, no bit tricks), so a
mistake in the tables or in the bf16 bit-pattern path of `formats.mxfp4` cannot hide in both.

Decoding: every byte value (both nibbles) under every E8M0 scale 0..254, to bf16 and float32.
Scale 255 is E8M0's NaN (readers refuse it); it decodes as the literal float32 formula always did.
Encoding: random data over a wide range of magnitudes, exact ties at every midpoint, saturation,
zero and negative-zero blocks (the sign bit is copied, so -0.0 is e2m1's -0), blocks reaching bf16 subnormals (the bit path's fallback), float32
just below a power of two (where log2 rounds up), transposed input, NaN/Inf refused.
"""
from __future__ import annotations

import math

import pytest
import torch

from gptoss_verify.formats import mxfp4

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # codes 0..7; bit 3 is the sign


# ---- the slow references ------------------------------------------------------------------------
def slow_value(nibble: int, scale: int) -> float:
    sign = -1.0 if nibble & 8 else 1.0
    return sign * E2M1[nibble & 7] * 2.0 ** (scale - 127)  # exact in Python floats


def slow_decode(blocks: torch.Tensor, scales: torch.Tensor) -> list[list[float]]:
    """[R, G, 16] + [R, G] -> rows of Python floats; byte b: element 2b low nibble, 2b+1 high."""
    rows = []
    for r in range(blocks.shape[0]):
        row = []
        for g in range(blocks.shape[1]):
            s = int(scales[r, g])
            for byte in blocks[r, g].tolist():
                row += [slow_value(byte & 0x0F, s), slow_value(byte >> 4, s)]
        rows.append(row)
    return rows


def slow_code(m: float) -> int:
    """Nearest e2m1 magnitude to m >= 0, ties to the even code, saturating at 6."""
    return min(range(8), key=lambda c: (abs(E2M1[c] - m), c % 2))


def slow_encode_block(values: list[float]) -> tuple[list[int], int]:
    amax = max(abs(v) for v in values)
    if amax == 0:
        return [8 if math.copysign(1.0, v) < 0 else 0 for v in values], 127
    exp = max(-127, min(127, math.frexp(amax)[1] - 1 - 2))  # floor(log2(amax)) - 2
    codes = [slow_code(abs(v) / 2.0 ** exp) + (8 if math.copysign(1.0, v) < 0 else 0) for v in values]
    return codes, exp + 127


def slow_encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, N] -> blocks [R, N/32, 16], scales [R, N/32] (inputs read as float32 values)."""
    rows = x.to(torch.float32).tolist()
    blocks, scales = [], []
    for row in rows:
        b_row, s_row = [], []
        for g in range(0, len(row), 32):
            codes, scale = slow_encode_block(row[g:g + 32])
            b_row.append([codes[2 * i] | codes[2 * i + 1] << 4 for i in range(16)])
            s_row.append(scale)
        blocks.append(b_row)
        scales.append(s_row)
    return torch.tensor(blocks, dtype=torch.uint8), torch.tensor(scales, dtype=torch.uint8)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# ---- decode -------------------------------------------------------------------------------------
def all_bytes_under(scale_values: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every byte 0..255 in every listed scale: [len(scales), 16 groups, 16] blocks."""
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16)
    blocks = blocks.expand(len(scale_values), 16, 16).contiguous()
    scales = torch.tensor(scale_values, dtype=torch.int32).to(torch.uint8)[:, None].expand(-1, 16).contiguous()
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_every_byte_under_every_scale(dtype):
    scale_values = list(range(255))
    blocks, scales = all_bytes_under(scale_values)
    got = mxfp4.decode(blocks, scales, dtype)
    want = torch.tensor(slow_decode(blocks, scales), dtype=torch.float64).to(dtype)  # exact values
    assert got.shape == (255, 16 * 32) and got.dtype == dtype
    assert torch.equal(bits(got), bits(want)), "decode differs from table[nibble]·2^(scale−127)"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_named_scales_in_chunks_and_shapes(dtype, monkeypatch):
    """0, 1, 126, 127, 128, 254 (bf16/float32 subnormal, one, largest) with several chunk sizes and
    leading shapes, so chunk edges fall inside tensors."""
    scale_values = [0, 1, 126, 127, 128, 254]
    blocks, scales = all_bytes_under(scale_values)
    want = torch.tensor(slow_decode(blocks, scales), dtype=torch.float64).to(dtype)
    for chunk in (32, 96, 1 << 19):
        monkeypatch.setattr(mxfp4, "_CHUNK_VALUES", chunk)
        got = mxfp4.decode(blocks.reshape(2, 3, 16, 16), scales.reshape(2, 3, 16), dtype)
        assert torch.equal(bits(got.reshape(6, -1)), bits(want))
    assert float(want[0, 2]) == 2.0 ** -128  # scale 0, byte 1, low nibble 1 (0.5): a subnormal, exact


def test_decode_scale_255_is_the_literal_formula():
    """E8M0 255 encodes NaN; decoding keeps what value·ldexp(1, 128) gives in float32 (±inf for
    non-zero values, NaN for zeros), rounded once to the output dtype, mixed with valid scales."""
    blocks, scales = all_bytes_under([127, 255, 3])
    lut = torch.tensor(E2M1 + [-v for v in E2M1], dtype=torch.float32)
    nibbles = torch.stack([blocks.long() & 15, blocks.long() >> 4], dim=-1).reshape(3, -1)
    factor = torch.ldexp(torch.ones(3), scales[:, 0].float() - 127)
    for dtype in (torch.bfloat16, torch.float32):
        want = (lut[nibbles] * factor[:, None]).to(dtype)
        got = mxfp4.decode(blocks, scales, dtype)
        assert torch.equal(bits(got), bits(want))
    row = mxfp4.decode(blocks, scales, torch.float32)[1]
    assert torch.isnan(row[0]) and torch.isnan(row[16]) and torch.isinf(row[2]) and row[18] < 0  # bytes 0, 8, 1, 9


def test_decode_other_dtypes_round_once_from_float32():
    blocks, scales = all_bytes_under([100, 127, 140])
    want = torch.tensor(slow_decode(blocks, scales), dtype=torch.float64)
    assert torch.equal(mxfp4.decode(blocks, scales, torch.float64), want)
    assert torch.equal(bits(mxfp4.decode(blocks, scales, torch.float16)), bits(want.to(torch.float16)))


# ---- encode -------------------------------------------------------------------------------------
def with_ties(gen: torch.Generator, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Blocks whose maximum is 4·2^k (so the shared exponent is k) holding every midpoint between
    grid points and values past 6 (saturation), both signs, with k from -100 to 100."""
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 7.0, 7.5]
    out = torch.empty(rows, 64, dtype=torch.float64)
    for r in range(rows):
        k = int(torch.randint(-100, 101, (1,), generator=gen))
        vals = [4.0] + [mids[int(i)] * (-1) ** int(j) for i, j in torch.randint(0, 10, (63, 2), generator=gen)]
        out[r] = torch.tensor(vals, dtype=torch.float64) * 2.0 ** k
    return out.to(dtype)


def wide_random(gen: torch.Generator, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Normal draws times a per-block magnitude 2^U(-140, 120): tiny blocks reach subnormals."""
    x = torch.randn(rows, 8, 32, generator=gen, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-140, 121, (rows, 8, 1), generator=gen).double())
    return x.reshape(rows, 256).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_encode_matches_the_rule(dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.cat([wide_random(gen, 24, dtype).reshape(-1, 64), with_ties(gen, 48, dtype)])
    x[0] = 0.0
    x[1, :32] = -0.0
    x[1, 32:] = torch.tensor(2.0 ** -133).to(dtype) if dtype == torch.bfloat16 else 2.0 ** -149
    x[2, :32] = torch.tensor([2.0 ** -130, -(2.0 ** -126), 0.0, 2.0 ** -128] * 8).to(dtype)
    got_b, got_s = mxfp4.encode(x)
    want_b, want_s = slow_encode(x)
    assert torch.equal(got_s, want_s)
    assert torch.equal(got_b, want_b)


def test_encode_float32_just_below_powers_of_two():
    """amax = 2^k·(1 − 2^-24): floor(log2) is k − 1 (the rule), though float32 log2 rounds to k."""
    x = torch.zeros(4, 32, dtype=torch.float32)
    for r, k in enumerate((8, 20, 100, -100)):
        x[r, 0] = (2.0 ** k) * (1 - 2.0 ** -24)
        x[r, 1] = -(2.0 ** (k - 3))
    got_b, got_s = mxfp4.encode(x)
    want_b, want_s = slow_encode(x)
    assert torch.equal(got_s, want_s) and torch.equal(got_b, want_b)
    assert got_s[0, 0] == 127 + 8 - 1 - 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_encode_transposed_and_chunked_input(dtype, monkeypatch):
    """An expert given as the HF module's [in, out] transpose encodes as its contiguous copy, with
    chunk edges inside rows of blocks."""
    gen = torch.Generator().manual_seed(11)
    dense = wide_random(gen, 6, dtype).reshape(3, 2, 256)  # [E, out, in]
    want_b, want_s = slow_encode(dense.reshape(6, 256))
    module_layout = dense.transpose(-1, -2).contiguous()  # [E, in, out]
    for chunk in (64, 300, 1 << 19):
        monkeypatch.setattr(mxfp4, "_CHUNK_VALUES", chunk)
        got_b, got_s = mxfp4.from_hf_dense(module_layout)
        assert got_b.shape == (3, 2, 8, 16) and got_s.shape == (3, 2, 8)
        assert torch.equal(got_b.reshape(6, 8, 16), want_b) and torch.equal(got_s.reshape(6, 8), want_s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encode_refuses_nonfinite(dtype, bad):
    x = torch.ones(3, 64, dtype=dtype)
    x[2, 40] = bad
    with pytest.raises(mxfp4.MXFP4Error, match="NaN or Inf"):
        mxfp4.encode(x)


def test_values_on_the_grid_survive_a_round_trip():
    gen = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (4, 7, 16), generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(100, 150, (4, 7), generator=gen, dtype=torch.int32).to(torch.uint8)
    dense = mxfp4.decode(blocks, scales)
    assert torch.equal(bits(mxfp4.decode(*mxfp4.encode(dense))), bits(dense))  # -0.0 included


def test_decode_encode_is_a_fixed_point_on_encoder_output():
    """Bytes the encoder wrote come back unchanged through the dense values (what a round trip
    through Megatron, which holds no MXFP4, relies on), -0 nibbles included."""
    gen = torch.Generator().manual_seed(9)
    for dtype in (torch.bfloat16, torch.float32):
        # magnitudes 2^-100 .. 2^100: no block underflows to all zeros (scale 127 on the way back)
        x = (torch.randn(8, 8, 32, generator=gen, dtype=torch.float64)
             * torch.exp2(torch.randint(-100, 101, (8, 8, 1), generator=gen).double())).reshape(8, 256).to(dtype)
        x[0, :32] = -0.0
        blocks, scales = mxfp4.encode(x)
        assert bool((blocks & 0x0F == 8).any())
        again = mxfp4.encode(mxfp4.decode(blocks, scales, dtype))
        assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)


def test_banded_transpose_copies_exactly(monkeypatch):
    from gptoss_verify.formats import tensor_ops
    monkeypatch.setattr(tensor_ops, "_BAND", 3)  # bands that do not divide the rows
    x = torch.arange(2 * 7 * 5, dtype=torch.int32).reshape(2, 7, 5).to(torch.bfloat16)
    got = tensor_ops.transpose_copy(x)
    assert got.is_contiguous() and torch.equal(got, x.transpose(-1, -2))
    view = x.transpose(-1, -2)
    assert torch.equal(tensor_ops.contiguous(view), view) and tensor_ops.contiguous(x) is x
