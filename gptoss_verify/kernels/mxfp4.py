"""MXFP4 decoding inside a Triton kernel (SPEC.md §6; the codec is `formats/mxfp4.py`).

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


# Four packed bytes and their four scale bytes in, eight bf16 out (two per 32-bit register). Per byte
# pair: spread the bytes to 16-bit lanes (prmt), place each nibble's sign at bit 15 and its magnitude
# code at bits 8..6 with one multiply (x·0x1040 = x<<6 + x<<12, no overlapping bits, then a mask):
# that bf16 is the e2m1 value times 2^-126 (code 1 becomes the subnormal 2^-127). Multiplying by 2^126
# and then by 2^(s-127) (bf16 bits s<<7) gives e2m1·2^(s-127) exactly; bf16 multiplies keep subnormals.
_E2M1_BF16_ASM = tl.constexpr("""
{
.reg .b32 x01, x23, s01, s23, t, c;
mov.b32 c, 0x7E807E80;
prmt.b32 x01, $4, 0, 0x4140;
prmt.b32 x23, $4, 0, 0x4342;
prmt.b32 s01, $5, 0, 0x4140;
prmt.b32 s23, $5, 0, 0x4342;
shl.b32 s01, s01, 7;
shl.b32 s23, s23, 7;
and.b32 t, x01, 0x000F000F;
mul.lo.u32 t, t, 0x1040;
and.b32 t, t, 0x81C081C0;
mul.rn.bf16x2 t, t, c;
mul.rn.bf16x2 $0, t, s01;
and.b32 t, x23, 0x000F000F;
mul.lo.u32 t, t, 0x1040;
and.b32 t, t, 0x81C081C0;
mul.rn.bf16x2 t, t, c;
mul.rn.bf16x2 $1, t, s23;
and.b32 t, x01, 0x00F000F0;
mul.lo.u32 t, t, 0x104;
and.b32 t, t, 0x81C081C0;
mul.rn.bf16x2 t, t, c;
mul.rn.bf16x2 $2, t, s01;
and.b32 t, x23, 0x00F000F0;
mul.lo.u32 t, t, 0x104;
and.b32 t, t, 0x81C081C0;
mul.rn.bf16x2 t, t, c;
mul.rn.bf16x2 $3, t, s23;
}
""")


@triton.jit
def decode_tile_bf16(packed, scales, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """As `decode_tile`, straight to bf16: [BLOCK_N, BLOCK_K/2] uint8 + [BLOCK_N, BLOCK_K/32] uint8 ->
    [BLOCK_N, BLOCK_K] bf16, exact for scale bytes 1..252. ASM (Hopper, sm_90: bf16x2 multiplies): about
    three instructions per element in packed 32-bit registers (`_E2M1_BF16_ASM`); otherwise (the
    interpreter, other GPUs) through `decode_tile`, which gives the same values for scale bytes 2..252."""
    if ASM:
        s = tl.reshape(tl.broadcast_to(scales[:, :, None], [BLOCK_N, BLOCK_K // 32, 16]), [BLOCK_N, BLOCK_K // 2])
        lo, hi = tl.inline_asm_elementwise(_E2M1_BF16_ASM, "=r,=r,=r,=r,r,r", [packed, s],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        return tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])
    return decode_tile(packed, scales, BLOCK_N, BLOCK_K).to(tl.bfloat16)
