"""The MXFP4 codec (docs/layouts.md §3; OCP Microscaling Formats v1.0).

Blocks of 32 e2m1 values share one E8M0 scale and run along the *input* (contraction) dimension:
`blocks [..., G, 16]` uint8 and `scales [..., G]` uint8 decode to `[..., G·32]`. Byte b of a block
holds element 2b in its low nibble and 2b+1 in its high nibble; value = table[nibble]·2^(scale−127).
Both checkpoint layouts store experts as `[E, out, in/32, ...]`; the HF module then uses the
transpose `[E, in, out]` (`to_hf_dense` / `from_hf_dense`).

Speed matters here: a full-width 20B layer holds 0.8 G expert values, and every conversion between
an MXFP4 layout and a dense one decodes or encodes all of them. Both directions therefore work on
bounded row chunks through lookup tables instead of per-nibble arithmetic:

- decode: one table of 256 scales × 256 bytes maps (scale, block byte) to *both* of the byte's
  values at once (a bf16 or float32 pair packed in one integer, low nibble first, so a
  little-endian view is the element order). Its entries are computed once by the literal formula
  (value·ldexp(1, scale−127) rounded once, scale 255 included), so the lookup is that formula,
  bit for bit, with no arithmetic per element; the table (256 or 512 KB) stays in cache.
- encode, bf16 input: the integer bit patterns do the work. |x|'s bits minus (exponent << 7) *are*
  the bits of the scaled magnitude m whenever m is a normal number, and the e2m1 code of m is a
  table lookup on those bits; blocks whose magnitudes come near bf16's subnormals take the float
  path instead. Other dtypes take the float path: float32 magnitudes, the exponent from `frexp`
  (exact, where log2 can round up for a float32 just below a power of two), and the code by the
  threshold comparisons. Both paths apply the same one rule (`_code_of_magnitude`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..schema import MXFP4_BLOCK
from .tensor_ops import transpose_copy

FP4_VALUES = (+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = MXFP4_BLOCK  # values sharing one scale (the schema's fact)
SCALE_BIAS = 127
E2M1_EMAX = 2  # the largest e2m1 magnitude is 6 = 1.5 · 2^2
_CHUNK_VALUES = 1 << 19  # values per chunk: temporaries stay in cache and small on full-size tensors
# bf16 fast-path bound: blocks with 0 < max|x| < 2^(_FAST_MIN_EXP + 2) take the float path, so that
# every magnitude the bit trick sees is normal or too small to reach the first threshold
_FAST_MIN_EXP = -120


class MXFP4Error(ValueError):
    pass


def check_pair(blocks: torch.Tensor, scales: torch.Tensor, name: str = "tensor") -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise MXFP4Error(f"{name}: expected uint8 blocks and scales, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise MXFP4Error(f"{name}: expected blocks [..., G, 16] and scales [..., G], got "
                         f"{list(blocks.shape)} and {list(scales.shape)}")


# ---- decode ---------------------------------------------------------------------------------------
_PAIR_INT = {2: (torch.int32, np.uint32), 4: (torch.int64, np.uint64)}  # element size -> packed pair
_FAST_DECODE = (torch.bfloat16, torch.float32)  # dtypes decoded through the (scale, byte) table
_tables: dict = {}


def _pair_table(dtype: torch.dtype) -> np.ndarray:
    """[256 · 256] integers: entry (scale << 8) | byte holds both values of `byte` under `scale`
    in `dtype` (low nibble first, so a little-endian view is the element order), each computed by
    the literal formula, scale 255 (E8M0 NaN) included."""
    if dtype not in _tables:
        every_byte = torch.arange(256, dtype=torch.uint8).repeat(256).reshape(256, 16, 16)  # [scale, group, 16]
        every_scale = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 16).contiguous()
        pairs = _decode_formula(every_byte, every_scale, dtype).reshape(256, 256, 2).contiguous()
        packed, np_int = _PAIR_INT[dtype.itemsize]
        _tables[dtype] = pairs.view(packed).reshape(256 * 256).numpy().view(np_int)
    return _tables[dtype]


def _decode_formula(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The definition, literally: table values, ldexp in float32, one rounding to `dtype`."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.int64)
    vals = torch.stack((lut[b & 0x0F], lut[b >> 4]), dim=-1).flatten(-2)  # low nibble first
    exp = scales.to(torch.int32) - SCALE_BIAS
    return torch.ldexp(vals, exp[..., None].to(torch.float32)).to(dtype)


def _decode_in_place(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`decode` on the tensors' own device by the formula, in row chunks of about 32 M values (the
    tables below are host-side numpy)."""
    lead, groups = blocks.shape[:-2], blocks.shape[-2]
    flat_b, flat_s = blocks.reshape(-1, groups, BLOCK // 2), scales.reshape(-1, groups)
    out = torch.empty(flat_b.shape[0], groups, BLOCK, dtype=dtype, device=blocks.device)
    rows = max(1, (_CHUNK_VALUES * 64) // (groups * BLOCK))
    for r in range(0, flat_b.shape[0], rows):
        out[r:r + rows] = _decode_formula(flat_b[r:r + rows], flat_s[r:r + rows], dtype)
    return out.reshape(*lead, groups * BLOCK)


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[..., G, 16] uint8 + [..., G] uint8 -> [..., G·32] in `dtype` (exact in bf16 for |exp| < 127)."""
    check_pair(blocks, scales)
    lead, groups = blocks.shape[:-2], blocks.shape[-2]
    if blocks.device.type != "cpu":  # an accelerator: no round trip through the host
        return _decode_in_place(blocks, scales, dtype)
    flat_b = blocks.reshape(-1, groups, BLOCK // 2)
    flat_s = scales.reshape(-1, groups)
    out = torch.empty(flat_b.shape[0], groups, BLOCK, dtype=dtype)
    rows = max(1, _CHUNK_VALUES // (groups * BLOCK))
    if dtype not in _FAST_DECODE:
        for r in range(0, flat_b.shape[0], rows):
            out[r:r + rows] = _decode_formula(flat_b[r:r + rows], flat_s[r:r + rows], dtype)
        return out.reshape(*lead, groups * BLOCK)
    table = _pair_table(dtype)
    out_pairs = out.view(_PAIR_INT[dtype.itemsize][0]).numpy().view(_PAIR_INT[dtype.itemsize][1])
    b_np, s_np = flat_b.contiguous().numpy(), flat_s.contiguous().numpy()
    index = np.empty((min(rows, flat_b.shape[0]), groups, BLOCK // 2), dtype=np.uint16)
    for r in range(0, flat_b.shape[0], rows):
        k = min(rows, flat_b.shape[0] - r)
        i = index[:k]  # (scale << 8) | byte, built in place
        np.left_shift(s_np[r:r + k, :, None], 8, out=i, dtype=np.uint16, casting="unsafe")
        np.bitwise_or(i, b_np[r:r + k], out=i, casting="unsafe")
        # mode="clip": no bounds buffer (the indices are < 65536 by construction), straight into `out`
        np.take(table, i, out=out_pairs[r:r + k], mode="clip")
    return out.reshape(*lead, groups * BLOCK)


# ---- encode ---------------------------------------------------------------------------------------
# Midpoints between neighbouring e2m1 magnitudes [0, .5, 1, 1.5, 2, 3, 4, 6], each with the side
# a tie goes to: to the even code (0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2,
# 3.5 -> 4, 5 -> 4). '>' sends a tie down, '>=' up. Above 6 everything saturates to code 7.
_THRESHOLDS = ((0.25, torch.gt), (0.75, torch.ge), (1.25, torch.gt), (1.75, torch.ge), (2.5, torch.gt),
               (3.5, torch.ge), (5.0, torch.gt))


def _code_of_magnitude(m: torch.Tensor) -> torch.Tensor:
    """e2m1 magnitude code (0..7) of scaled magnitudes m >= 0, round to nearest, ties to even."""
    code = torch.zeros(m.shape, dtype=torch.uint8)
    for threshold, op in _THRESHOLDS:
        code += op(m, threshold)
    return code


def _bf16_code_table() -> np.ndarray:
    """Code of every non-negative bf16 bit pattern below 8.0 (m < 8 always holds), by the rule."""
    if "codes" not in _tables:
        bits = torch.arange(_BF16_EIGHT, dtype=torch.int32).to(torch.int16)
        _tables["codes"] = _code_of_magnitude(bits.view(torch.bfloat16).float()).numpy()
    return _tables["codes"]


def _bf16_bits(v: float) -> int:
    return int(torch.tensor(v, dtype=torch.bfloat16).view(torch.int16))


_BF16_EIGHT = _bf16_bits(8.0)  # every scaled magnitude m is below 8
_BF16_INF = _bf16_bits(float("inf"))  # |x| bit patterns from here up are Inf or NaN


def _pack(code: np.ndarray) -> np.ndarray:
    """[..., 32] codes < 16 -> [..., 16] bytes, element 2b in the low nibble: read as little-endian
    uint16 a pair is lo | hi << 8, and (pair | pair >> 4) keeps lo | hi << 4 in its low byte."""
    pair = code.view(np.uint16)
    return (pair | (pair >> 4)).astype(np.uint8)


def _encode_bf16(chunk: torch.Tensor, blocks_out: np.ndarray, scales_out: np.ndarray) -> bool:
    """[r, G·32] bf16 (contiguous) -> blocks/scales through the bit patterns; False (nothing
    written) when a block's magnitudes reach bf16's subnormals, for the float path to take."""
    r, n = chunk.shape
    bits = chunk.view(torch.int16).numpy().reshape(r, n // BLOCK, BLOCK)
    mag = bits & np.int16(0x7FFF)
    amax = torch.from_numpy(mag).amax(-1).numpy()
    if int(amax.max(initial=0)) >= _BF16_INF:
        raise MXFP4Error("encode: input holds NaN or Inf")
    if bool(((amax > 0) & (amax < ((_FAST_MIN_EXP + E2M1_EMAX + SCALE_BIAS) << 7))).any()):
        return False
    # floor(log2(amax)) is amax's exponent field - 127; the shared exponent is 2 below it
    exp = np.where(amax > 0, (amax >> 7) - (SCALE_BIAS + E2M1_EMAX), 0).astype(np.int16)
    key = mag - (exp << 7)[..., None]  # the bits of m = |x|·2^-exp (normal m; else tiny, code 0)
    np.clip(key, 0, _BF16_EIGHT - 1, out=key)
    code = _bf16_code_table().take(key)
    code |= (bits.view(np.uint16) >> 15).astype(np.uint8) << 3  # the sign bit, as for -0.0
    blocks_out[...] = _pack(code)
    scales_out[...] = (exp + SCALE_BIAS).astype(np.uint8)
    return True


def _encode_float(chunk: torch.Tensor, blocks_out: np.ndarray, scales_out: np.ndarray) -> None:
    r, n = chunk.shape
    xf = chunk.to(torch.float32).reshape(r, n // BLOCK, BLOCK)
    m = xf.abs()
    amax = m.amax(-1)  # NaN propagates
    if not bool(torch.isfinite(amax).all()):
        raise MXFP4Error("encode: input holds NaN or Inf")
    _, e = torch.frexp(amax)  # amax = f·2^e, f in [0.5, 1): floor(log2(amax)) = e - 1, exactly
    exp = torch.where(amax > 0, e - 1 - E2M1_EMAX, torch.zeros_like(e)).clamp(-SCALE_BIAS, SCALE_BIAS)
    m /= torch.ldexp(torch.ones_like(amax), exp)[..., None]  # exact (a power of two)
    code = _code_of_magnitude(m)
    code |= torch.signbit(xf).to(torch.uint8) << 3
    blocks_out[...] = _pack(code.numpy())
    scales_out[...] = (exp + SCALE_BIAS).to(torch.uint8).numpy()


def _row_chunks(x: torch.Tensor, rows: int):
    """Chunks [k, N] of x's rows (all leading dims flattened) in order, each contiguous, never a
    copy of the whole of a non-contiguous x (a transposed expert is copied chunk by chunk)."""
    n = x.shape[-1]
    try:
        flat = x.view(-1, n)
    except RuntimeError:
        for i in range(x.shape[0]):
            yield from _row_chunks(x[i], rows)
        return
    banded = not flat.is_contiguous() and flat.t().is_contiguous()  # an expert given as [in, out]
    for r in range(0, flat.shape[0], rows):
        yield transpose_copy(flat[r:r + rows].t()) if banded else flat[r:r + rows].contiguous()


def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] (N a multiple of 32) -> (blocks [..., N/32, 16], scales [..., N/32]).

    OCP MX rule: shared exponent = floor(log2(max|x|)) − 2, so the block's largest element lands in
    [4, 8) and elements are rounded to the nearest e2m1 value (ties to the even code), saturating at
    ±6. The sign bit is copied (−0.0 and small negatives give −0, code 8), so decode -> encode gives
    back the same bytes. An all-zero block gets scale 127. Values on the grid of their block
    decode exactly.
    Inputs wider than float32 are rounded to float32 first.
    """
    if x.shape[-1] % BLOCK:
        raise MXFP4Error(f"encode: last dimension must be a multiple of {BLOCK}, got {x.shape[-1]}")
    device = x.device
    x = x.detach().cpu()
    lead, n = x.shape[:-1], x.shape[-1]
    groups = n // BLOCK
    total = math.prod(lead)
    blocks = np.empty((total, groups, BLOCK // 2), dtype=np.uint8)
    scales = np.empty((total, groups), dtype=np.uint8)
    rows = max(1, _CHUNK_VALUES // max(n, 1))
    r = 0
    for chunk in _row_chunks(x, rows) if n else ():
        k = chunk.shape[0]
        b_out, s_out = blocks[r:r + k], scales[r:r + k]
        if chunk.dtype != torch.bfloat16 or not _encode_bf16(chunk, b_out, s_out):
            _encode_float(chunk, b_out, s_out)
        r += k
    return (torch.from_numpy(blocks).reshape(*lead, groups, BLOCK // 2).to(device),
            torch.from_numpy(scales).reshape(*lead, groups).to(device))


def to_hf_dense(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Checkpoint blocks/scales [E, out, in/32, 16] -> the HF module's dense [E, in, out]."""
    return transpose_copy(decode(blocks, scales, dtype))


def from_hf_dense(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The HF module's dense [E, in, out] -> checkpoint blocks/scales [E, out, in/32, 16]."""
    return encode(weight.transpose(-1, -2))
