"""The MXFP4 codec (SPEC.md §6; OCP Microscaling Formats v1.0).

Blocks of 32 e2m1 values share one E8M0 scale and run along the *input* (contraction) dimension:
`blocks [..., G, 16]` uint8 and `scales [..., G]` uint8 decode to `[..., G·32]`. Byte b of a block
holds element 2b in its low nibble and 2b+1 in its high nibble; value = table[nibble]·2^(scale−127).
Both checkpoint layouts store experts as `[E, out, in/32, ...]`; the HF module then uses the
transpose `[E, in, out]` (`to_hf_dense` / `from_hf_dense`).
"""
from __future__ import annotations

import torch

FP4_VALUES = (+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
SCALE_BIAS = 127
E2M1_EMAX = 2  # the largest e2m1 magnitude is 6 = 1.5 · 2^2
_CHUNK_ROWS = 1 << 16  # rows decoded at a time, so temporaries stay small on full-size tensors


class MXFP4Error(ValueError):
    pass


def check_pair(blocks: torch.Tensor, scales: torch.Tensor, name: str = "tensor") -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise MXFP4Error(f"{name}: expected uint8 blocks and scales, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise MXFP4Error(f"{name}: expected blocks [..., G, 16] and scales [..., G], got "
                         f"{list(blocks.shape)} and {list(scales.shape)}")


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[..., G, 16] uint8 + [..., G] uint8 -> [..., G·32] in `dtype` (exact in bf16 for |exp| < 127)."""
    check_pair(blocks, scales)
    lead, groups = blocks.shape[:-2], blocks.shape[-2]
    flat_b = blocks.reshape(-1, groups, BLOCK // 2)
    flat_s = scales.reshape(-1, groups)
    out = torch.empty(flat_b.shape[0], groups, BLOCK, dtype=dtype, device=blocks.device)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    for r in range(0, flat_b.shape[0], _CHUNK_ROWS):
        b = flat_b[r:r + _CHUNK_ROWS].to(torch.int64)
        vals = torch.stack((lut[b & 0x0F], lut[b >> 4]), dim=-1).flatten(-2)  # low nibble first
        exp = flat_s[r:r + _CHUNK_ROWS].to(torch.int32) - SCALE_BIAS
        out[r:r + _CHUNK_ROWS] = torch.ldexp(vals, exp[..., None].to(torch.float32)).to(dtype)
    return out.reshape(*lead, groups * BLOCK)


def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] (N a multiple of 32) -> (blocks [..., N/32, 16], scales [..., N/32]).

    OCP MX rule: shared exponent = floor(log2(max|x|)) − 2, so the block's largest element lands in
    [4, 8) and elements are rounded to the nearest e2m1 value (ties to the even code), saturating at
    ±6. An all-zero block gets scale 127. Values already on the grid of their block decode exactly.
    """
    if x.shape[-1] % BLOCK:
        raise MXFP4Error(f"encode: last dimension must be a multiple of {BLOCK}, got {x.shape[-1]}")
    if not torch.isfinite(x).all():
        raise MXFP4Error("encode: input holds NaN or Inf")
    lead, n = x.shape[:-1], x.shape[-1]
    xb = x.reshape(-1, n // BLOCK, BLOCK).to(torch.float32)
    amax = xb.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0 ** -140))) - E2M1_EMAX,
                      torch.zeros_like(amax)).clamp(-SCALE_BIAS, SCALE_BIAS)
    m = (xb / torch.ldexp(torch.ones_like(amax), exp.to(torch.int32))[..., None]).abs()
    # thresholds between grid points; '>' sends a tie down, '>=' up, so ties land on even codes
    code = ((m > 0.25).int() + (m >= 0.75).int() + (m > 1.25).int() + (m >= 1.75).int()
            + (m > 2.5).int() + (m >= 3.5).int() + (m > 5.0).int())
    code = code + 8 * (xb < 0).int()
    code = code.to(torch.uint8)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    scales = (exp + SCALE_BIAS).to(torch.uint8)
    return packed.reshape(*lead, n // BLOCK, BLOCK // 2), scales.reshape(*lead, n // BLOCK)


def to_hf_dense(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Checkpoint blocks/scales [E, out, in/32, 16] -> the HF module's dense [E, in, out]."""
    return decode(blocks, scales, dtype).transpose(-1, -2).contiguous()


def from_hf_dense(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The HF module's dense [E, in, out] -> checkpoint blocks/scales [E, out, in/32, 16]."""
    return encode(weight.transpose(-1, -2))
