"""Backward kernels of the fused MoE (docs/moe-kernel.md, "Backward").

The forward under autograd keeps its routing (slot order, row blocks, float32 routing weights), the
activation [rows, I] and the gate/up pre-activation [rows, 2I] (input dtype), so GEMM 1 is not
recomputed. With dO the gradient of the output, for a slot s = (token t, choice j) on expert e with
routing weight w:

  dA_s   = dO_t @ down[e]^T                   (`dact_kernel`: a plain GEMM, float32 out)
  dw_s   = dA_s · act_s + dO_t · down_bias[e]   (`swiglu_bwd_kernel`; + the returned weights' gradient)
  dpre_s = SwiGLU'(pre_s) ⊙ (w · dA_s)          (`swiglu_bwd_kernel`; zero where a clamp is active)
  dX_s   = dpre_s @ gate_up[e]^T               (`dx_slot_kernel`, float32, slot order)
  d down[e]    = Σ_s act_s^T (w · dO_t)       (`expert_grad_kernel`, rows of e as K)
  d gate_up[e] = Σ_s h_t^T dpre_s             (same kernel; w·dO and h first gathered into sorted
                                               rows by `gather_rows_kernel`)
  d biases     = Σ_s over each expert's rows  (`block_sums_kernel` per row block, then
                                               `expert_sums_kernel` over the expert's blocks)
  d logits     = softmax backward of dw over the chosen k, scattered (`router_grad_kernel`)
  dh_t = Σ_j dX_(t,j) + dlogits_t @ router_weight  (`dx_combine_kernel`, fixed order)
  d router_weight = dlogits^T @ h, d router_bias = Σ_t dlogits  (`router_wgrad_kernel` + reduce)

No float atomics. The sums over an expert's rows (its weight and bias gradients) run in the rows'
sorted order, which on a GPU follows the top-k kernel's integer atomics: those gradients can differ
from run to run by float32 summation order (the forward's values do not depend on it). Every other
sum (dX, dw, the router's) runs in a fixed order and is bitwise repeatable.
MXFP4 experts are read transposed ([K = out, N = in], packed along N) and decoded with
`mxfp4.decode_tile` (tl.dot_scaled packs along K only).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._moe_gemm import _tile_ids
from .mxfp4 import decode_tile


@triton.jit
def _wt_tile(w_ptr, s_ptr, e, k0, n0, offs_n, n_ok, K, N, stride_we, stride_wk, stride_wn, stride_se, stride_sk,
             MXFP4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile at (k0, offs_n) of expert e's forward weight transposed: K runs over
    the forward's output dimension, N over its input. Dense: any strides. MXFP4: checkpoint blocks
    [E, out, in/32, 16] (rows = K, packed along N) decoded in registers."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    if MXFP4:
        offs_b = n0 // 2 + tl.arange(0, BLOCK_N // 2)  # n0: a multiple of BLOCK_N (>= 32)
        offs_g = n0 // 32 + tl.arange(0, BLOCK_N // 32)
        rows_w = w_ptr + e * stride_we + offs_k[:, None].to(tl.int64) * stride_wk
        rows_s = s_ptr + e * stride_se + offs_k[:, None].to(tl.int64) * stride_sk
        packed = tl.load(rows_w + offs_b[None, :], mask=k_ok[:, None] & (offs_b < N // 2)[None, :], other=0)
        scales = tl.load(rows_s + offs_g[None, :], mask=k_ok[:, None] & (offs_g < N // 32)[None, :], other=127)
        return decode_tile(packed, scales, BLOCK_K, BLOCK_N).to(DTYPE)
    else:
        ptrs = w_ptr + e * stride_we + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn
        return tl.load(ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)


@triton.jit
def _dot(acc, a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit(do_not_specialize=["num_m"])
def dact_kernel(dout_ptr, w_ptr, s_ptr, da_ptr, sorted_slot_ptr, block_expert_ptr, block_rows_ptr, N, K, num_m,
                stride_do, stride_we, stride_wk, stride_wn, stride_se, stride_sk,
                TOPK: tl.constexpr, MXFP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    """Per row block x tile of I: dA = dO[token] @ down[e]^T, stored float32 in sorted-row order. A plain
    GEMM with a store-only epilogue, as the forward's GEMM 2: the SwiGLU derivative and the dw reduction
    in this epilogue (a [BLOCK_M, 2·BLOCK_N] pre-activation tile next to the accumulator) made it 3x
    slower per FLOP than dx_slot on the H200; they run in `swiglu_bwd_kernel` instead."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_m, N, BLOCK_N, GROUP_M)
    nrows = tl.load(block_rows_ptr + pid_m)
    if nrows == 0:
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < nrows
    slot = tl.load(sorted_slot_ptr + pid_m * BLOCK_M + offs_m, mask=row_ok, other=0)
    token = (slot // TOPK).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    a_base = dout_ptr + token[:, None] * stride_do
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(a_base + offs_k[None, :], mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(a_base + offs_k[None, :], mask=row_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        b = _wt_tile(w_ptr, s_ptr, e, k0, pid_n * BLOCK_N, offs_n, n_ok, K, N, stride_we, stride_wk, stride_wn,
                     stride_se, stride_sk, MXFP4, BLOCK_N, BLOCK_K, a.dtype)
        acc = _dot(acc, a, b, IEEE)
    rows = (pid_m * BLOCK_M + offs_m).to(tl.int64)
    tl.store(da_ptr + rows[:, None] * N + offs_n[None, :], acc, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _swiglu_grad(da, pre, alpha, limit, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """dpre [BLOCK_R, 2·BLOCK_N] (interleaved gate/up) from da = w·dA [BLOCK_R, BLOCK_N] and the
    pre-activation pre [BLOCK_R, 2·BLOCK_N] (float32): the clamped SwiGLU's derivative."""
    gate, up = tl.split(tl.reshape(pre, [BLOCK_R, BLOCK_N, 2]))
    g = tl.minimum(gate, limit)
    sig = tl.sigmoid(alpha * g)
    u = tl.minimum(tl.maximum(up, -limit), limit)
    # torch's clamp passes the gradient on the closed interval: zero only strictly beyond the limit
    dg = tl.where(gate <= limit, da * (u + 1.0) * (sig + alpha * g * sig * (1.0 - sig)), 0.0)
    du = tl.where((up >= -limit) & (up <= limit), da * g * sig, 0.0)
    return tl.reshape(tl.join(dg, du), [BLOCK_R, 2 * BLOCK_N])


@triton.jit
def swiglu_bwd_kernel(da_ptr, act_ptr, pre_ptr, weights32_ptr, dpre_ptr, dw_ptr, sorted_slot_ptr, block_rows_ptr,
                      N, alpha, limit, ROW_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per BLOCK_R sorted rows (inside one row block), walking all of I: dpre = SwiGLU'(pre) ⊙ (w·dA)
    in the input dtype, and dw = Σ_i dA·act (float32, one value per slot, so no partials to reduce).
    Memory-bound elementwise work, kept out of the dact GEMM's epilogue; padding rows are skipped."""
    r0 = tl.program_id(0) * BLOCK_R
    nrows = tl.load(block_rows_ptr + r0 // ROW_BLOCK)
    first = r0 % ROW_BLOCK
    if first >= nrows:
        return
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = first + offs_r < nrows
    rows = (r0 + offs_r).to(tl.int64)
    slot = tl.load(sorted_slot_ptr + rows, mask=row_ok, other=0)
    w = tl.load(weights32_ptr + slot, mask=row_ok, other=0.0)
    dw = tl.zeros([BLOCK_R], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (offs_n < N)[None, :]
        da = tl.load(da_ptr + rows[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
        act = tl.load(act_ptr + rows[:, None] * N + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
        dw += tl.sum(da * act, axis=1)
        offs_p = 2 * n0 + tl.arange(0, 2 * BLOCK_N)
        p_ok = row_ok[:, None] & (offs_p < 2 * N)[None, :]
        pre = tl.load(pre_ptr + rows[:, None] * (2 * N) + offs_p[None, :], mask=p_ok, other=0.0).to(tl.float32)
        dpre = _swiglu_grad(da * w[:, None], pre, alpha, limit, BLOCK_R, BLOCK_N)
        tl.store(dpre_ptr + rows[:, None] * (2 * N) + offs_p[None, :], dpre.to(dpre_ptr.dtype.element_ty), mask=p_ok)
    tl.store(dw_ptr + slot, dw, mask=row_ok)


@triton.jit(do_not_specialize=["num_m"])
def dx_slot_kernel(dpre_ptr, w_ptr, s_ptr, dxs_ptr, sorted_slot_ptr, block_expert_ptr, block_rows_ptr, N, K, num_m,
                   stride_we, stride_wk, stride_wn, stride_se, stride_sk,
                   MXFP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, IEEE: tl.constexpr):
    """Per row block x tile of H: dX_slot = dpre @ gate_up[e]^T, float32, written in slot order."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_m, N, BLOCK_N, GROUP_M)
    nrows = tl.load(block_rows_ptr + pid_m)
    if nrows == 0:
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < nrows
    rows = (pid_m * BLOCK_M + offs_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    a_base = dpre_ptr + rows[:, None] * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_base + offs_k[None, :], mask=row_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        b = _wt_tile(w_ptr, s_ptr, e, k0, pid_n * BLOCK_N, offs_n, n_ok, K, N, stride_we, stride_wk, stride_wn, stride_se, stride_sk,
                     MXFP4, BLOCK_N, BLOCK_K, a.dtype)
        acc = _dot(acc, a, b, IEEE)
    slot = tl.load(sorted_slot_ptr + pid_m * BLOCK_M + offs_m, mask=row_ok, other=0).to(tl.int64)
    tl.store(dxs_ptr + slot[:, None] * N + offs_n[None, :], acc, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _expert_rows(counts_ptr, e, E, ROW_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """(first row, row count) of expert e in the padded sorted layout of the align kernel."""
    ecol = tl.arange(0, BLOCK_E)
    count = tl.load(counts_ptr + ecol, mask=ecol < E, other=0)
    padded = (count + ROW_BLOCK - 1) // ROW_BLOCK * ROW_BLOCK
    starts = tl.cumsum(padded, 0) - padded
    start = tl.sum(tl.where(ecol == e, starts, 0), axis=0)
    cnt = tl.sum(tl.where(ecol == e, count, 0), axis=0)
    return start, cnt


@triton.jit
def gather_rows_kernel(y_ptr, weights32_ptr, out_ptr, sorted_slot_ptr, block_rows_ptr, N, stride_y,
                       SCALED: tl.constexpr, TOPK: tl.constexpr, ROW_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """out[row] = Y[token] (h), or w_slot · Y[token] (w·dO: the float32 product rounded once to the input
    dtype, as the reference's autograd rounds it), for the real rows of row block b, in sorted order.
    The weight gradients then read both operands as plain contiguous rows, fully pipelined: gathered
    through the slot in expert_grad's K loop the loads were pipelined one stage shallower (the index
    load takes a stage), and scaled there every dO tile went through registers before the MMA."""
    b = tl.program_id(0)
    nrows = tl.load(block_rows_ptr + b)
    if nrows == 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    for r0 in range(0, nrows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < nrows
        rows = (b * ROW_BLOCK + r).to(tl.int64)
        slot = tl.load(sorted_slot_ptr + rows, mask=r_ok, other=0)
        ok = r_ok[:, None] & n_ok[None, :]
        y = tl.load(y_ptr + (slot // TOPK).to(tl.int64)[:, None] * stride_y + offs_n[None, :], mask=ok, other=0.0)
        if SCALED:
            w = tl.load(weights32_ptr + slot, mask=r_ok, other=0.0)
            y = (y.to(tl.float32) * w[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], y, mask=ok)


@triton.jit
def expert_grad_kernel(x_ptr, y_ptr, out_ptr, counts_ptr, M, N, E, stride_x, stride_y, ROW_BLOCK: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       IEEE: tl.constexpr):
    """out[e] = X_e^T @ Y_e over expert e's rows (K = its row count; both in sorted rows): d down =
    act^T (w·dO) and d gate_up = h^T dpre. An expert with no rows gets zeros."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    e = pid // (tiles_m * tiles_n)
    pid_m = (pid % (tiles_m * tiles_n)) // tiles_n
    pid_n = pid % tiles_n
    start, cnt = _expert_rows(counts_ptr, e, E, ROW_BLOCK, BLOCK_E)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, cnt, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        r_ok = r < cnt
        rows = (start + r).to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs_m[None, :], mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        y = tl.load(y_ptr + rows[:, None] * stride_y + offs_n[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(acc, tl.trans(x), y, IEEE)
    ptrs = out_ptr + e.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def block_sums_kernel(y_ptr, part_ptr, block_rows_ptr, N, stride_y, ROW_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """part[b] = Σ over the real rows of row block b of Y (sorted rows; float32, in row order): the first
    pass of the bias gradients. One program per (row block, column tile), so the whole GPU shares an
    expert's rows (one program per expert and column tile walking all of its rows took 0.74 ms at
    T = 4096 on the H200)."""
    b = tl.program_id(0)
    nrows = tl.load(block_rows_ptr + b)
    if nrows == 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, nrows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rows = (b * ROW_BLOCK + r).to(tl.int64)
        y = tl.load(y_ptr + rows[:, None] * stride_y + offs_n[None, :], mask=(r < nrows)[:, None] & n_ok[None, :],
                    other=0.0)
        acc += tl.sum(y.to(tl.float32), axis=0)
    tl.store(part_ptr + b.to(tl.int64) * N + offs_n, acc, mask=n_ok)


@triton.jit
def expert_sums_kernel(part_ptr, out_ptr, counts_ptr, N, E, ROW_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """out[e] = Σ of expert e's row-block partials in block order, cast once (an expert without rows has
    no blocks: zeros). A fixed order of blocks, no float atomics."""
    e = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    start, cnt = _expert_rows(counts_ptr, e, E, ROW_BLOCK, BLOCK_E)
    ptrs = part_ptr + (start // ROW_BLOCK).to(tl.int64) * N + offs_n
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for _ in range(0, (cnt + ROW_BLOCK - 1) // ROW_BLOCK):
        acc += tl.load(ptrs, mask=n_ok, other=0.0)
        ptrs += N
    tl.store(out_ptr + e.to(tl.int64) * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit(do_not_specialize=["T"])
def router_grad_kernel(dwa_ptr, dout_ptr, dnb_ptr, idx_ptr, weights32_ptr, dweights_ptr, dlogits_ptr,
                       dl_ptr, T, E, H, stride_do, stride_be,
                       HAS_DOUT: tl.constexpr, HAS_DW: tl.constexpr, HAS_DL: tl.constexpr, TOPK: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TOPK: tl.constexpr,
                       BLOCK_H: tl.constexpr):
    """dw per slot (Σ_i dA·act from `swiglu_bwd_kernel` + dO·down_bias[e] + the returned weights' gradient),
    the softmax-over-k backward, scattered onto the chosen experts, plus the logits' own gradient:
    dl [T, E] float32."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    kcol = tl.arange(0, BLOCK_TOPK)
    slot = rows[:, None] * TOPK + kcol[None, :]
    slot_ok = row_ok[:, None] & (kcol < TOPK)[None, :]
    sel = tl.load(idx_ptr + slot, mask=slot_ok, other=0)
    dw = tl.zeros([BLOCK_T, BLOCK_TOPK], dtype=tl.float32)
    if HAS_DOUT:
        dw += tl.load(dwa_ptr + slot, mask=slot_ok, other=0.0)
        for j in tl.static_range(TOPK):
            ej = tl.sum(tl.where(kcol[None, :] == j, sel, 0), axis=1)
            dot = tl.zeros([BLOCK_T], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                hk = h0 + tl.arange(0, BLOCK_H)
                m = row_ok[:, None] & (hk < H)[None, :]
                d = tl.load(dout_ptr + rows[:, None].to(tl.int64) * stride_do + hk[None, :], mask=m, other=0.0)
                b = tl.load(dnb_ptr + ej[:, None] * stride_be + hk[None, :], mask=m, other=0.0)
                dot += tl.sum(d.to(tl.float32) * b.to(tl.float32), axis=1)
            dw += tl.where(kcol[None, :] == j, dot[:, None], 0.0)
    if HAS_DW:
        dw += tl.load(dweights_ptr + slot, mask=slot_ok, other=0.0).to(tl.float32)
    w = tl.load(weights32_ptr + slot, mask=slot_ok, other=0.0)
    dsel = w * (dw - tl.sum(w * dw, axis=1)[:, None])
    cols = tl.arange(0, BLOCK_E)
    ok = row_ok[:, None] & (cols < E)[None, :]
    lptr = rows[:, None].to(tl.int64) * E + cols[None, :]
    if HAS_DL:
        dl = tl.load(dlogits_ptr + lptr, mask=ok, other=0.0).to(tl.float32)
    else:
        dl = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        ej = tl.sum(tl.where(kcol[None, :] == j, sel, 0), axis=1)
        dj = tl.sum(tl.where(kcol[None, :] == j, dsel, 0.0), axis=1)
        dl += tl.where(cols[None, :] == ej[:, None], dj[:, None], 0.0)
    tl.store(dl_ptr + lptr, dl, mask=ok)


@triton.jit(do_not_specialize=["T"])
def dx_combine_kernel(dxs_ptr, dl_ptr, rw_ptr, dx_ptr, T, E, H, stride_rw, stride_dx,
                      HAS_EXPERT: tl.constexpr, TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """dh[t] = Σ_j dX_slot[t·k + j] (j = 0..k−1) + dl[t] @ router_weight, float32 (IEEE), cast once."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < T
    n_ok = offs_n < H
    cols = tl.arange(0, BLOCK_E)
    e_ok = cols < E
    dl = tl.load(dl_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=row_ok[:, None] & e_ok[None, :],
                 other=0.0)
    rw = tl.load(rw_ptr + cols[:, None] * stride_rw + offs_n[None, :], mask=e_ok[:, None] & n_ok[None, :],
                 other=0.0).to(tl.float32)
    acc = tl.dot(dl, rw, input_precision="ieee")
    ok = row_ok[:, None] & n_ok[None, :]
    if HAS_EXPERT:
        for j in tl.static_range(TOPK):
            slot = rows.to(tl.int64) * TOPK + j
            acc += tl.load(dxs_ptr + slot[:, None] * H + offs_n[None, :], mask=ok, other=0.0)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * stride_dx + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=ok)


@triton.jit(do_not_specialize=["T", "t_per_split"])
def router_wgrad_kernel(dl_ptr, h_ptr, part_ptr, partb_ptr, T, E, H, t_per_split, stride_h,
                        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """Partials over a slice of tokens: part[s] = dl^T @ h (float32, IEEE), partb[s] = Σ_t dl."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    n_ok = offs_n < H
    cols = tl.arange(0, BLOCK_E)
    e_ok = cols < E
    acc = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    accb = tl.zeros([BLOCK_E], dtype=tl.float32)
    t_end = tl.minimum(T, (split + 1) * t_per_split)
    for t0 in range(split * t_per_split, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        r_ok = rows < t_end
        dl = tl.load(dl_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=r_ok[:, None] & e_ok[None, :],
                     other=0.0)
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + offs_n[None, :],
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(dl), h, acc, input_precision="ieee")
        accb += tl.sum(dl, axis=0)
    base = split.to(tl.int64) * E * H
    tl.store(part_ptr + base + cols[:, None] * H + offs_n[None, :], acc, mask=e_ok[:, None] & n_ok[None, :])
    if tl.program_id(0) == 0:
        tl.store(partb_ptr + split * E + cols, accb, mask=e_ok)


@triton.jit
def router_wgrad_reduce_kernel(part_ptr, partb_ptr, drw_ptr, drb_ptr, splits, E, H, BLOCK: tl.constexpr):
    """Sum the router-weight partials in split order and cast once; program 0 also does the bias."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < E * H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + s * E * H + offs, mask=ok, other=0.0)
    tl.store(drw_ptr + offs, acc.to(drw_ptr.dtype.element_ty), mask=ok)
    if tl.program_id(0) == 0:
        offs_e = tl.arange(0, BLOCK)
        accb = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(0, splits):
            accb += tl.load(partb_ptr + s * E + offs_e, mask=offs_e < E, other=0.0)
        tl.store(drb_ptr + offs_e, accb.to(drb_ptr.dtype.element_ty), mask=offs_e < E)
