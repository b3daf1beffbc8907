"""Triton backward kernels for attention with sinks: dQ per query block, and dK/dV per key block
over the kv head's whole query group (each program owns its keys: no atomics). P is recomputed
from the saved log-sum-exp (sink included), so the sink's share is already out of every P_ij;
dSink is computed on the host from the same log-sum-exp. Blocks that every query (or key) of a
tile sees whole skip the mask, as in the forward."""
from __future__ import annotations

import triton
import triton.language as tl

from ._attention_masks import _query_block, _split_key_range, _split_query_range, _visible


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, sos, soh, n_q, HQ: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """δ_i = ⟨O_i, dO_i⟩ in float32, [B, Hq, Sq]: grid (B·Hq, query blocks); O and dO share strides."""
    bh = tl.program_id(0)
    b = bh // HQ
    h = bh % HQ
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = b * sob + h * soh + offs_m[:, None] * sos + tl.arange(0, D)[None, :]
    o = tl.load(O + offs, mask=offs_m[:, None] < n_q, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=offs_m[:, None] < n_q, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * n_q + offs_m, tl.sum(o * do, 1), mask=offs_m < n_q)


@triton.jit
def _dq_keys(dq, q, do, lse2, delta, k_ptr, v_ptr, sks, svs, offs_d, q_pos, lo, hi, n_k, k_start, window, qk_scale,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, SLIDING: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            k = tl.load(k_ptr + offs_n[:, None] * sks + offs_d[None, :], mask=offs_n[:, None] < n_k, other=0.0)
            v = tl.load(v_ptr + offs_n[:, None] * svs + offs_d[None, :], mask=offs_n[:, None] < n_k, other=0.0)
        else:
            k = tl.load(k_ptr + offs_n[:, None] * sks + offs_d[None, :])
            v = tl.load(v_ptr + offs_n[:, None] * svs + offs_d[None, :])
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where(_visible(q_pos, offs_n, n_k, k_start, window, SLIDING), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, L, DELTA, DQ,
                 sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
                 n_q, n_k, q_start, k_start, window, scale,
                 HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, PREC: tl.constexpr):
    """dQ_i = scale · Σ_j P_ij (dO_i·V_j − δ_i) K_j over the keys query i sees (δ_i = O_i·dO_i)."""
    b, h, kvh, first_row = _query_block(HQ, GROUP, BLOCK_M)
    offs_m = first_row + tl.arange(0, BLOCK_M)
    bh = b * HQ + h
    offs_d = tl.arange(0, D)
    row_mask = offs_m[:, None] < n_q
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=row_mask, other=0.0)
    lse2 = tl.load(L + bh * n_q + offs_m, mask=offs_m < n_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * n_q + offs_m, mask=offs_m < n_q, other=0.0)
    q_pos = q_start + offs_m
    qk_scale = scale * 1.4426950408889634
    first_q = q_start + first_row
    last_q = tl.minimum(first_q + BLOCK_M - 1, q_start + n_q - 1)
    lo, a, c, hi = _split_key_range(first_q, last_q, n_k, k_start, window, BLOCK_N, SLIDING)
    k_ptr = K + b * skb + kvh * skh
    v_ptr = V + b * svb + kvh * svh
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    dq = _dq_keys(dq, q, do, lse2, delta, k_ptr, v_ptr, sks, svs, offs_d, q_pos, lo, a, n_k, k_start, window,
                  qk_scale, BLOCK_N, True, SLIDING, PREC)
    dq = _dq_keys(dq, q, do, lse2, delta, k_ptr, v_ptr, sks, svs, offs_d, q_pos, a, c, n_k, k_start, window,
                  qk_scale, BLOCK_N, False, SLIDING, PREC)
    dq = _dq_keys(dq, q, do, lse2, delta, k_ptr, v_ptr, sks, svs, offs_d, q_pos, c, hi, n_k, k_start, window,
                  qk_scale, BLOCK_N, True, SLIDING, PREC)
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_mask)


@triton.jit
def _dkdv_queries(dk, dv, k, v, q_ptr, do_ptr, l_ptr, delta_ptr, sqs, offs_d, offs_n, lo, hi, n_q, n_k, q_start,
                  k_start, window, qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, SLIDING: tl.constexpr,
                  PREC: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if MASKED:
            row_mask = offs_m[:, None] < n_q
            q = tl.load(q_ptr + offs_m[:, None] * sqs + offs_d[None, :], mask=row_mask, other=0.0)
            do = tl.load(do_ptr + offs_m[:, None] * sqs + offs_d[None, :], mask=row_mask, other=0.0)
            lse2 = tl.load(l_ptr + offs_m, mask=offs_m < n_q, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_ptr + offs_m, mask=offs_m < n_q, other=0.0)
        else:
            q = tl.load(q_ptr + offs_m[:, None] * sqs + offs_d[None, :])
            do = tl.load(do_ptr + offs_m[:, None] * sqs + offs_d[None, :])
            lse2 = tl.load(l_ptr + offs_m) * 1.4426950408889634
            delta = tl.load(delta_ptr + offs_m)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse2[:, None])
        if MASKED:
            visible = _visible(q_start + offs_m, offs_n, n_k, k_start, window, SLIDING) & (offs_m[:, None] < n_q)
            p = tl.where(visible, p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, L, DELTA, DK, DV,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
                   n_q, n_k, q_start, k_start, window, scale,
                   HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, PREC: tl.constexpr):
    """dV_j = Σ_i P_ij dO_i and dK_j = scale · Σ_i dS_ij Q_i over the GROUP query heads of this kv
    head and the queries that see key j. Grid (B·Hkv, key blocks): the first key blocks (seen by
    the most queries) are issued first."""
    bkv = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = bkv // HKV
    kvh = bkv % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_mask = offs_n[:, None] < n_k
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    first_k = k_start + pid_n * BLOCK_N
    lo, a, c, hi = _split_query_range(first_k, first_k + BLOCK_N - 1, n_q, q_start, window, BLOCK_M, SLIDING)
    for g in range(GROUP):
        h = kvh * GROUP + g
        bh = b * (HKV * GROUP) + h
        q_ptr = Q + b * sqb + h * sqh
        do_ptr = DO + b * sqb + h * sqh
        dk, dv = _dkdv_queries(dk, dv, k, v, q_ptr, do_ptr, L + bh * n_q, DELTA + bh * n_q, sqs, offs_d, offs_n,
                               lo, a, n_q, n_k, q_start, k_start, window, qk_scale, BLOCK_M, True, SLIDING, PREC)
        dk, dv = _dkdv_queries(dk, dv, k, v, q_ptr, do_ptr, L + bh * n_q, DELTA + bh * n_q, sqs, offs_d, offs_n,
                               a, c, n_q, n_k, q_start, k_start, window, qk_scale, BLOCK_M, False, SLIDING, PREC)
        dk, dv = _dkdv_queries(dk, dv, k, v, q_ptr, do_ptr, L + bh * n_q, DELTA + bh * n_q, sqs, offs_d, offs_n,
                               c, hi, n_q, n_k, q_start, k_start, window, qk_scale, BLOCK_M, True, SLIDING, PREC)
    tl.store(DK + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)
