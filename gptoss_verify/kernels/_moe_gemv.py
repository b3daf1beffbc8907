"""MXFP4 expert GEMVs for a handful of decode slots (T·k ≤ 16): one program per (slot, column tile).

Why not the row-block GEMMs: at T = 1 the four slots sit in four 16-row blocks of which one row is
real, and `tl.dot_scaled`'s in-loop upcast (about six instructions per weight element, plus the
tensor-core bookkeeping) left the layer at about a quarter of the bytes floor (docs/moe-kernel.md).
A slot's output is a matrix-vector product, so here the CUDA cores do it: the expert's rows stream
as 32-bit words of eight e2m1 codes, each code becomes the float16 bit pattern of its value · 2^-14
(exact for all 16 codes; `_decode_words`), widened to float32 and multiplied by the activation. The
products are summed per 32-element group, each group sum times its scale 2^(s−127), and the tile's
sums times 2^14 at the end. No align pass either: a slot's expert is read from the top-k indices.

Fixed summation order and no atomics, so the result is bitwise deterministic like the GEMM path.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._moe_gemm import _swiglu_store


@triton.jit
def _e8m0(s):
    """2^(s − 127) as float32 for E8M0 scale bytes s (int32), as the codec reads them: 0 is 2^−127 (a
    subnormal), 255 is 2^128 (infinite)."""
    return tl.where(s == 0, 5.877471754111438e-39, (s << 23).to(tl.float32, bitcast=True))


# _decode_words in PTX: the same integer formulas; prmt is the byte move, and the mov into two
# 16-bit registers keeps each pair in one register up to the conversions (written in Triton, the
# compiler splits every pair into two halves and masks each on its own: about twice the operations).
# One pair step per code pair (j, j + 4), from word e (even codes) or o (odd codes), in the order of
# the Triton form's _halves calls: bytes 0 and 2 moved up into the halves' high bytes (0x2404), or
# bytes 1 and 3 kept there (0x3414).
_PAIR_PTX = """prmt.b32 r, {word}, z, {move};
mov.b32 {{l, h}}, r;
cvt.f32.f16 ${lo}, l;
cvt.f32.f16 ${hi}, h;
"""
_DECODE_PTX = tl.constexpr("""{
.reg .b32 e, o, t, r, z;
.reg .b16 l, h;
mov.b32 z, 0;
shl.b32 e, $8, 1;
and.b32 e, e, 0x0E0E0E0E;
shl.b32 t, $8, 4;
and.b32 t, t, 0x80808080;
or.b32 e, e, t;
shr.b32 o, $8, 3;
and.b32 o, o, 0x0E0E0E0E;
and.b32 t, $8, 0x80808080;
or.b32 o, o, t;
""" + "".join(_PAIR_PTX.format(word=word, move=move, lo=j, hi=j + 4)
              for j, (word, move) in enumerate((("e", "0x2404"), ("o", "0x2404"), ("e", "0x3414"), ("o", "0x3414"))))
    + "}")


@triton.jit
def _decode_words(words, PTX: tl.constexpr):
    """The eight codes of each uint32 word (code j in bits 4j..4j+3) as float32 code value · 2^-14, in
    code order. Each code's bits are first moved to the top byte of a float16 (sign to bit 7 of the
    byte, magnitude to bits 1..3: bits 15 and 9..11 of the half), even codes into one word and odd
    codes into another (5 integer ops); then each pair of codes j, j + 4 is one byte move into the
    high bytes of the two halves of a register, which the widening conversion reads as float16.
    PTX on the GPU; under the interpreter (which runs no PTX) the same formulas in Triton."""
    if PTX:
        return tl.inline_asm_elementwise(_DECODE_PTX, "=f,=f,=f,=f,=f,=f,=f,=f,r", [words], dtype=(tl.float32,) * 8,
                                         is_pure=True, pack=1)
    even = ((words << 1) & 0x0E0E0E0E) | ((words << 4) & 0x80808080)  # codes 0, 2, 4, 6 in bytes 0..3
    odd = ((words >> 3) & 0x0E0E0E0E) | (words & 0x80808080)  # codes 1, 3, 5, 7 in bytes 0..3
    l0, h0 = _halves((even << 8) & 0xFF00FF00)
    l1, h1 = _halves((odd << 8) & 0xFF00FF00)
    l2, h2 = _halves(even & 0xFF00FF00)
    l3, h3 = _halves(odd & 0xFF00FF00)
    return l0, l1, l2, l3, h0, h1, h2, h3


@triton.jit
def _halves(pair):
    """The two float16 halves of a uint32, widened to float32 (low half first)."""
    lo = (pair & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (pair >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _mx_row_dots(w_ptr, s_ptr, x_ptr, e, offs_n, n_ok, K, stride_we, stride_wn, stride_se, stride_sn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PTX: tl.constexpr):
    """[BLOCK_N] float32: Σ_k x[k]·W[e, n, k] over the rows n of the tile; W as MXFP4 words (w_ptr: int32,
    eight codes each, low nibble first; four words per 32-element group; strides in groups) and scales
    [E, N, K/32]; x: K activations. Tiles are [groups, rows, 4 words]: Triton lays the threads along
    groups, so each thread holds whole groups (their sums and scaling stay in registers) of several
    rows, for which it loads and widens each activation once. It pays at the wider tiles it allows:
    the layer at T = 4 took 0.148 ms with [rows, groups, 4 words] at 16 × 512
    (reports/gpu-2026-12-04b-h200) and takes 0.111 with this layout at choose_config's tiles
    (reports/gpu-2026-12-04c-h200; 0.223 at 16 × 512); at T = 1 the GEMVs are as before (23.9 against
    24.4 µs for gate_up).
    The next step's words and scales are loaded before this step's arithmetic (a register double
    buffer: twice the bytes in flight)."""
    BLOCK_G: tl.constexpr = BLOCK_K // 32
    # the word strides come in 16-byte units (stride_we, stride_wn: words / 4), so that the compiler
    # can prove each group's 4 words aligned and load them as one 16-byte vector: Triton specialises
    # only integers divisible by 16, and a row of 2880 codes is 360 words (8 · 45)
    rows = offs_n[None, :, None].to(tl.int64)
    w_rows = w_ptr + (e * stride_we + rows * stride_wn) * 4
    s_rows = s_ptr + e * stride_se + rows * stride_sn
    row_ok = n_ok[None, :, None]
    words, s = _mx_step_loads(w_rows, s_rows, row_ok, 0, K, BLOCK_G)
    acc = tl.zeros([BLOCK_G, BLOCK_N, 1], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        next_words, next_s = _mx_step_loads(w_rows, s_rows, row_ok, k0 + BLOCK_K, K, BLOCK_G)  # none past K
        codes = _decode_words(words.to(tl.uint32, bitcast=True), PTX)
        # the activations of each word's 8 codes; past K (the last step's masked groups, whose codes are
        # 0) the last group's are read again instead of a masked load (which costs a register clear per
        # value): in-bounds, finite unless the input is, and multiplied by 0
        offs_g = tl.minimum(k0 // 32 + tl.arange(0, BLOCK_G), K // 32 - 1)[:, None, None]
        first = (offs_g * 4 + tl.arange(0, 4)[None, None, :]) * 8  # [groups, 1, 4]
        part = tl.zeros([BLOCK_G, BLOCK_N, 4], dtype=tl.float32)
        for p in tl.static_range(8):
            part += codes[p] * tl.load(x_ptr + first + p).to(tl.float32)
        acc += tl.sum(part, axis=2, keep_dims=True) * _e8m0(s.to(tl.int32))
        words, s = next_words, next_s
    return tl.sum(tl.sum(acc, axis=2), axis=0) * 16384.0


@triton.jit
def _mx_step_loads(w_rows, s_rows, row_ok, k0, K, BLOCK_G: tl.constexpr):
    """The words [BLOCK_G, rows, 4] and scale bytes [BLOCK_G, rows, 1] of the step at column k0."""
    offs_g = (k0 // 32 + tl.arange(0, BLOCK_G))[:, None, None]
    ok = row_ok & (offs_g < K // 32)
    words = tl.load(w_rows + offs_g * 4 + tl.arange(0, 4)[None, None, :], mask=ok, other=0)
    return words, tl.load(s_rows + offs_g, mask=ok, other=127)


@triton.jit
def gemv_gate_up_kernel(h_ptr, w_ptr, s_ptr, bias_ptr, idx_ptr, act_ptr, N, K, stride_h, stride_we, stride_wn,
                        stride_se, stride_sn, stride_be, stride_act, alpha, limit,
                        TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PTX: tl.constexpr):
    """act[slot] = clamped SwiGLU(h[token] @ gate_up[e] + bias) for this program's BLOCK_N/2 columns."""
    slot = tl.program_id(0)
    e = tl.load(idx_ptr + slot).to(tl.int64)
    token = (slot // TOPK).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = _mx_row_dots(w_ptr, s_ptr, h_ptr + token * stride_h, e, offs_n, n_ok, K, stride_we, stride_wn, stride_se,
                       stride_sn, BLOCK_N, BLOCK_K, PTX)
    one = tl.arange(0, 1)  # the epilogue is the row-block GEMM's, on a block of one row: this slot
    _swiglu_store(acc[None, :], bias_ptr, act_ptr, act_ptr, e, slot, tl.program_id(1), one, one < 1, offs_n, n_ok,
                  N, stride_be, stride_act, alpha, limit, 1, BLOCK_N, False)


@triton.jit
def gemv_down_kernel(act_ptr, w_ptr, s_ptr, bias_ptr, idx_ptr, weights32_ptr, y_ptr, N, K, stride_act, stride_we,
                     stride_wn, stride_se, stride_sn, stride_be, stride_y,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PTX: tl.constexpr):
    """y[slot] = (act[slot] @ down[e] + bias) × routing weight, rounded once to y's dtype."""
    slot = tl.program_id(0).to(tl.int64)
    e = tl.load(idx_ptr + slot).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = _mx_row_dots(w_ptr, s_ptr, act_ptr + slot * stride_act, e, offs_n, n_ok, K, stride_we, stride_wn,
                       stride_se, stride_sn, BLOCK_N, BLOCK_K, PTX)
    bias = tl.load(bias_ptr + e * stride_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    y = (acc + bias) * tl.load(weights32_ptr + slot)
    tl.store(y_ptr + slot * stride_y + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)
