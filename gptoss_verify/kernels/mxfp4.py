"""MXFP4 decoding inside a Triton kernel (docs/layouts.md §3; the codec is `formats/mxfp4.py`).

`decode_tile` turns a tile of packed e2m1 bytes and their E8M0 scales into float32 values in
registers, so a GEMM can stream the checkpoint's blocks and scales straight from memory with no
dense copy of the weights. The float32 bit pattern is built directly: for a magnitude code
c = (e, m) with e ≥ 1 the value 2^(e−1)·(1 + m/2)·2^(s−127) has exponent field e + s − 1 and
mantissa m, so its bits are `(c << 22) + ((s − 1) << 23)`; code 1 (0.5) is `(s − 1) << 23` and
code 0 is zero. The decode is exact for scale bytes 2..252; bytes outside are clamped to [1, 252]
(so the exponent field stays in range), which differs from the codec only at the E8M0 extremes
(0 = 2^−127, 1 where code 1 would be a float32 subnormal, 253+ where 6·2^(s−127) nears float32's
limit, 255 = NaN). Published checkpoints use scales far inside that range.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def decode_tile(packed, scales, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """packed [BLOCK_N, BLOCK_K/2] uint8 (low nibble = even element), scales [BLOCK_N, BLOCK_K/32]
    uint8 -> [BLOCK_N, BLOCK_K] float32 (exact)."""
    p = packed.to(tl.int32)
    nib = tl.reshape(tl.join(p & 0xF, p >> 4), [BLOCK_N, BLOCK_K])  # element 2b, then 2b+1
    s = tl.minimum(tl.maximum(scales.to(tl.int32), 1), 252)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], [BLOCK_N, BLOCK_K // 32, 32]), [BLOCK_N, BLOCK_K])
    code = nib & 7
    base = (s - 1) << 23
    bits = tl.where(code >= 2, (code << 22) + base, tl.where(code == 1, base, 0))
    bits = bits | ((nib & 8) << 28)
    return bits.to(tl.float32, bitcast=True)

