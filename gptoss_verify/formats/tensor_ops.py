"""Copies that torch does slowly on CPU, done in cache-sized pieces.

`x.transpose(-1, -2).contiguous()` of a full-width expert (5760 x 2880 bf16) walks the source
column by column and runs at a few hundred M values/s; copying bands of 256 source rows at a time
keeps each band in cache while it is scattered into the output's columns, 4-6x faster. Converters
transpose every expert (the HF module holds them [in, out], checkpoints and Megatron [out, in]).
"""
from __future__ import annotations

import torch

_BAND = 256  # source rows per band (256 x 2880 bf16 = 1.4 MB)


def transpose_copy(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A contiguous copy of `x.transpose(-1, -2)` (any leading dims), written band by band."""
    *lead, rows, cols = x.shape
    if out is None:
        out = torch.empty(*lead, cols, rows, dtype=x.dtype, device=x.device)
    if x.dim() > 2:
        for i in range(x.shape[0]):
            transpose_copy(x[i], out[i])
        return out
    for r in range(0, rows, _BAND):
        out[:, r:r + _BAND] = x[r:r + _BAND].t()
    return out


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t.contiguous()`, with a transposed view of a contiguous tensor copied band by band."""
    if t.is_contiguous():
        return t
    if t.dim() >= 2 and t.transpose(-1, -2).is_contiguous():
        return transpose_copy(t.transpose(-1, -2))
    return t.contiguous()
