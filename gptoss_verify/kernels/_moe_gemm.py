"""Grouped GEMM kernels of the fused MoE and the deterministic combine.

Row blocks come from `align_kernel` (one expert per block). Weights are read either dense in the HF
layout (`[E, in, out]`, used as x @ W) or as MXFP4 checkpoint blocks/scales (`[E, out, in/32, 16]` and
`[E, out, in/32]`), decoded tile by tile in the inner loop: by Triton's `tl.dot_scaled` (bf16/fp16
activations; SCALED) or by our own `mxfp4.decode_tile` (float32 activations, or SCALED off).

GEMM 1: gathered token rows @ gate_up[e] + bias, then the clamped SwiGLU on the interleaved columns
(even = gate, odd = up) in the epilogue; only the activation [rows, I] is written.
GEMM 2: activation @ down[e] + bias, times the routing weight, rounded once to the input dtype and
written in slot order. Combine: each token sums its k slot rows in order j = 0..k−1 in float32 (no
atomics), cast once.

Split-K (SPLIT_K > 1, for a handful of decode tokens, where one program per output tile leaves most
of the chip idle while it walks all of K): each of the SPLIT_K programs of a tile sums one slice of K
and writes its float32 partial in slot order; `swiglu_kernel` then sums GEMM 1's partials in split
order and applies bias and SwiGLU, and the combine sums GEMM 2's partials in split order and adds the
bias times the routing weight. Fixed orders throughout, so the result stays bitwise deterministic.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .mxfp4 import decode_tile


@triton.jit
def _tile_ids(pid, num_m, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row blocks sweep the columns together, so weight tiles stay in L2."""
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _weight_tile(w_ptr, s_ptr, e, k0, offs_n, n_ok, K, stride_we, stride_wk, stride_wn, stride_se, stride_sn,
                 MXFP4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 DTYPE: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile of expert e's weight at (k0, offs_n), as DTYPE."""
    if MXFP4:
        packed, scales = _mx_tile(w_ptr, s_ptr, e, k0, offs_n, n_ok, K, stride_we, stride_wn, stride_se, stride_sn,
                                  BLOCK_K, EVEN_K)
        return tl.trans(decode_tile(packed, scales, BLOCK_N, BLOCK_K).to(DTYPE))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ptrs = w_ptr + e * stride_we + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn
        if EVEN_K:
            return tl.load(ptrs, mask=n_ok[None, :], other=0.0)
        return tl.load(ptrs, mask=(offs_k < K)[:, None] & n_ok[None, :], other=0.0)


@triton.jit
def _mx_tile(w_ptr, s_ptr, e, k0, offs_n, n_ok, K, stride_we, stride_wn, stride_se, stride_sn,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Expert e's packed MXFP4 bytes [BLOCK_N, BLOCK_K/2] and scales [BLOCK_N, BLOCK_K/32] at (offs_n, k0)."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    offs_g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    base_w = w_ptr + e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    base_s = s_ptr + e * stride_se + offs_n[:, None].to(tl.int64) * stride_sn
    if EVEN_K:
        packed = tl.load(base_w + offs_b[None, :], mask=n_ok[:, None], other=0)
        scales = tl.load(base_s + offs_g[None, :], mask=n_ok[:, None], other=127)
    else:
        packed = tl.load(base_w + offs_b[None, :], mask=n_ok[:, None] & (offs_b < K // 2)[None, :], other=0)
        scales = tl.load(base_s + offs_g[None, :], mask=n_ok[:, None] & (offs_g < K // 32)[None, :], other=127)
    return packed, scales


@triton.jit
def _accumulate(acc, a, w_ptr, s_ptr, e, k0, offs_n, n_ok, K, stride_we, stride_wk, stride_wn, stride_se, stride_sn,
                MXFP4: tl.constexpr, SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, IEEE: tl.constexpr, LHS_FORMAT: tl.constexpr):
    """acc + a @ W[e][k0:k0+BLOCK_K, offs_n]; MXFP4 either through tl.dot_scaled (SCALED) or decoded here."""
    if MXFP4 and SCALED:
        packed, scales = _mx_tile(w_ptr, s_ptr, e, k0, offs_n, n_ok, K, stride_we, stride_wn, stride_se, stride_sn,
                                  BLOCK_K, EVEN_K)
        acc = tl.dot_scaled(a, None, LHS_FORMAT, tl.trans(packed), scales, "e2m1", acc=acc, fast_math=True)
    else:
        b = _weight_tile(w_ptr, s_ptr, e, k0, offs_n, n_ok, K, stride_we, stride_wk, stride_wn, stride_se,
                         stride_sn, MXFP4, BLOCK_N, BLOCK_K, EVEN_K, a.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _swiglu_store(acc, bias_ptr, act_ptr, pre_ptr, e, pid_m, pid_n, offs_m, row_ok, offs_n, n_ok, N, stride_be,
                  stride_act, alpha, limit, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SAVE_PRE: tl.constexpr):
    """Bias, then the clamped SwiGLU on the interleaved (gate, up) columns of acc; store the activation
    (and, under autograd, the pre-activation in the input dtype, for the backward's SwiGLU derivative)."""
    bias = tl.load(bias_ptr + e * stride_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    acc = acc + bias[None, :]
    if SAVE_PRE:
        pre_rows = (pid_m * BLOCK_M + offs_m).to(tl.int64)
        tl.store(pre_ptr + pre_rows[:, None] * N + offs_n[None, :], acc.to(pre_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])
    gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N // 2, 2]))
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    act = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    offs_i = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    rows = (pid_m * BLOCK_M + offs_m).to(tl.int64)
    tl.store(act_ptr + rows[:, None] * stride_act + offs_i[None, :], act.to(act_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_i < N // 2)[None, :])


@triton.jit
def _store_partial(part_ptr, acc, slot, row_ok, offs_n, n_ok, N, stride_ps):
    """This split's float32 partial of the tile, in slot order: part[split, slot, n]."""
    base = part_ptr + tl.program_id(1).to(tl.int64) * stride_ps
    tl.store(base + slot[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_m", "steps_per_split"])
def gate_up_kernel(h_ptr, w_ptr, s_ptr, bias_ptr, act_ptr, pre_ptr, part_ptr, sorted_slot_ptr, block_expert_ptr,
                   block_rows_ptr, N, K, num_m, steps_per_split, stride_h, stride_we, stride_wk, stride_wn, stride_se,
                   stride_sn, stride_be, stride_act, stride_ps, alpha, limit,
                   TOPK: tl.constexpr, MXFP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                   SCALED: tl.constexpr, LHS_FORMAT: tl.constexpr, SPLIT_K: tl.constexpr, SAVE_PRE: tl.constexpr):
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
    a_base = h_ptr + token[:, None] * stride_h
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo, k_hi = _k_range(K, steps_per_split, SPLIT_K, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(a_base + offs_k[None, :], mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(a_base + offs_k[None, :], mask=row_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        acc = _accumulate(acc, a, w_ptr, s_ptr, e, k0, offs_n, n_ok, K, stride_we, stride_wk, stride_wn, stride_se,
                          stride_sn, MXFP4, SCALED, BLOCK_N, BLOCK_K, EVEN_K, IEEE, LHS_FORMAT)
    if SPLIT_K > 1:
        _store_partial(part_ptr, acc, slot, row_ok, offs_n, n_ok, N, stride_ps)
    else:
        _swiglu_store(acc, bias_ptr, act_ptr, pre_ptr, e, pid_m, pid_n, offs_m, row_ok, offs_n, n_ok, N, stride_be,
                      stride_act, alpha, limit, BLOCK_M, BLOCK_N, SAVE_PRE)


@triton.jit
def _k_range(K, steps_per_split, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's slice of K: all of it, or slice program_id(1) of steps_per_split BLOCK_K steps
    (written as a multiple of BLOCK_K, so the compiler still knows the loads' alignment and pipelines them)."""
    if SPLIT_K > 1:
        k_lo = tl.program_id(1) * steps_per_split * BLOCK_K
        return k_lo, tl.minimum(K, k_lo + steps_per_split * BLOCK_K)
    return 0, K


@triton.jit
def swiglu_kernel(part_ptr, bias_ptr, act_ptr, pre_ptr, sorted_slot_ptr, block_expert_ptr, block_rows_ptr, N, splits,
                  stride_ps, stride_be, stride_act, alpha, limit, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SAVE_PRE: tl.constexpr):
    """After a split-K GEMM 1: sum the partials of each row in split order, then bias and SwiGLU."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    nrows = tl.load(block_rows_ptr + pid_m)
    if nrows == 0:
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < nrows
    slot = tl.load(sorted_slot_ptr + pid_m * BLOCK_M + offs_m, mask=row_ok, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    ptrs = part_ptr + slot[:, None] * N + offs_n[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, splits):
        acc += tl.load(ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        ptrs += stride_ps
    _swiglu_store(acc, bias_ptr, act_ptr, pre_ptr, e, pid_m, pid_n, offs_m, row_ok, offs_n, n_ok, N, stride_be,
                  stride_act, alpha, limit, BLOCK_M, BLOCK_N, SAVE_PRE)


@triton.jit(do_not_specialize=["num_m", "steps_per_split"])
def down_kernel(act_ptr, w_ptr, s_ptr, bias_ptr, weights32_ptr, y_ptr, part_ptr, sorted_slot_ptr, block_expert_ptr,
                block_rows_ptr, N, K, num_m, steps_per_split, stride_act, stride_we, stride_wk, stride_wn, stride_se,
                stride_sn, stride_be, stride_y, stride_ps,
                MXFP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, SCALED: tl.constexpr,
                LHS_FORMAT: tl.constexpr, SPLIT_K: tl.constexpr):
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
    a_base = act_ptr + rows[:, None] * stride_act
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo, k_hi = _k_range(K, steps_per_split, SPLIT_K, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(a_base + offs_k[None, :], mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(a_base + offs_k[None, :], mask=row_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        acc = _accumulate(acc, a, w_ptr, s_ptr, e, k0, offs_n, n_ok, K, stride_we, stride_wk, stride_wn, stride_se,
                          stride_sn, MXFP4, SCALED, BLOCK_N, BLOCK_K, EVEN_K, IEEE, LHS_FORMAT)
    slot = tl.load(sorted_slot_ptr + pid_m * BLOCK_M + offs_m, mask=row_ok, other=0)
    if SPLIT_K > 1:
        _store_partial(part_ptr, acc, slot, row_ok, offs_n, n_ok, N, stride_ps)
    else:
        bias = tl.load(bias_ptr + e * stride_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        weight = tl.load(weights32_ptr + slot, mask=row_ok, other=0.0)
        y = (acc + bias[None, :]) * weight[:, None]
        tl.store(y_ptr + slot[:, None].to(tl.int64) * stride_y + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def combine_kernel(y_ptr, out_ptr, part_ptr, idx_ptr, weights32_ptr, bias_ptr, N, splits, stride_y, stride_out,
                   stride_ps, stride_be, TOPK: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """out[token] = Σ_j y[token·k + j] in order j = 0..k−1; after a split-K GEMM 2, each y is first
    summed from its partials in split order, plus the bias, times the routing weight."""
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        slot = token * TOPK + j
        if SPLIT_K > 1:
            e = tl.load(idx_ptr + slot).to(tl.int64)
            y = tl.load(bias_ptr + e * stride_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            ptrs = part_ptr + slot * N + offs_n
            part = tl.zeros([BLOCK_N], dtype=tl.float32)
            for _ in range(0, splits):
                part += tl.load(ptrs, mask=n_ok, other=0.0)
                ptrs += stride_ps
            acc += (part + y) * tl.load(weights32_ptr + slot)
        else:
            acc += tl.load(y_ptr + slot * stride_y + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
