"""Triton forward kernels for attention with sinks: prefill (one query head per program, query
blocks heaviest first) and decode (a kv head's whole query group packed into one tile, keys split
over programs, then a log-sum-exp merge).

The sink is folded into the online softmax: the running max starts at the head's sink logit and
the running denominator at exp(sink − max) = 1, so the sink takes part in the max subtraction and
the denominator but contributes no value row. Scores are kept in base 2 (scale·log2 e folded into
one multiply, exp2 instead of exp); the stored log-sum-exp is natural.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._attention_masks import _group_rows, _packed_query, _query_block, _split_key_range, _visible


@triton.jit
def _online_softmax_keys(acc, l_i, m_i, q, k_ptr, v_ptr, sks, svs, offs_d, q_pos, lo, hi, n_k, k_start, window,
                         qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, SLIDING: tl.constexpr,
                         PREC: tl.constexpr):
    """Accumulate keys [lo, hi) into (acc, l, m); MASKED=False only for whole visible blocks.
    m is kept in scaled (base-2) units while the scores stay unscaled, so the scale and the max
    subtraction are one fused multiply-add per score (the loop is bound by per-score instructions
    at head_dim 64: 3-10 % faster prefill on the H200, reports/gpu-2026-12-04-h200/ab-attention.md)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            k = tl.load(k_ptr + offs_n[:, None] * sks + offs_d[None, :], mask=offs_n[:, None] < n_k, other=0.0)
        else:
            k = tl.load(k_ptr + offs_n[:, None] * sks + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if MASKED:
            qk = tl.where(_visible(q_pos, offs_n, n_k, k_start, window, SLIDING), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0: max(x)·c = max(x·c)
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet and a −inf sink
        else:
            m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptr + offs_n[:, None] * svs + offs_d[None, :], mask=offs_n[:, None] < n_k, other=0.0)
        else:
            v = tl.load(v_ptr + offs_n[:, None] * svs + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, S, O, L,
              sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
              n_q, n_k, q_start, k_start, window, qk_scale,
              HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, PREC: tl.constexpr,
              SPLIT_MASK: tl.constexpr):
    """Prefill: grid (B·Hq, query blocks); the last query blocks (most keys) are issued first.
    SPLIT_MASK: whole visible key blocks run a loop without the mask (pays on long rows); without
    it one masked loop covers all keys (pays on a narrow window: one pipelined loop, not three)."""
    b, h, kvh, first_row = _query_block(HQ, GROUP, BLOCK_M)
    offs_m = first_row + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=offs_m[:, None] < n_q,
                other=0.0)
    q_pos = q_start + offs_m
    sink = tl.load(S + h).to(tl.float32) * 1.4426950408889634
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.where(sink == float("-inf"), 0.0, 1.0)  # exp2(sink − m)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    first_q = q_start + first_row
    last_q = tl.minimum(first_q + BLOCK_M - 1, q_start + n_q - 1)
    lo, a, c, hi = _split_key_range(first_q, last_q, n_k, k_start, window, BLOCK_N, SLIDING)
    k_ptr = K + b * skb + kvh * skh
    v_ptr = V + b * svb + kvh * svh
    if SPLIT_MASK:
        acc, l_i, m_i = _online_softmax_keys(acc, l_i, m_i, q, k_ptr, v_ptr, sks, svs, offs_d, q_pos, lo, a, n_k,
                                             k_start, window, qk_scale, BLOCK_N, True, SLIDING, PREC)
        acc, l_i, m_i = _online_softmax_keys(acc, l_i, m_i, q, k_ptr, v_ptr, sks, svs, offs_d, q_pos, a, c, n_k,
                                             k_start, window, qk_scale, BLOCK_N, False, SLIDING, PREC)
        acc, l_i, m_i = _online_softmax_keys(acc, l_i, m_i, q, k_ptr, v_ptr, sks, svs, offs_d, q_pos, c, hi, n_k,
                                             k_start, window, qk_scale, BLOCK_N, True, SLIDING, PREC)
    else:
        acc, l_i, m_i = _online_softmax_keys(acc, l_i, m_i, q, k_ptr, v_ptr, sks, svs, offs_d, q_pos, lo, hi, n_k,
                                             k_start, window, qk_scale, BLOCK_N, True, SLIDING, PREC)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past the end with a −inf sink: nothing to divide
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=offs_m[:, None] < n_q)
    tl.store(L + (b * HQ + h) * n_q + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=offs_m < n_q)


@triton.jit
def _attn_decode(Q, K, V, S, O, L, PO, PM, PL,
                 sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
                 n_q, n_k, q_start, k_start, window, qk_scale, keys_lo, keys_hi, chunk,
                 HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, SINGLE: tl.constexpr,
                 PREC: tl.constexpr):
    """Decode: grid (splits, B·Hkv). Tile row r is query r % n_q of head kvh·GROUP + r // n_q, so
    the group's K/V are read once. Split s covers keys [keys_lo + s·chunk, … + chunk) ∩ [.., keys_hi).
    SINGLE (one split): normalise with the sink and store the output. Otherwise store the split's
    unnormalised accumulator, running max (base 2) and denominator for `_attn_decode_merge`."""
    split = tl.program_id(0)
    bkv, b, rows, row_ok, i, h = _group_rows(n_q, HKV, GROUP, BLOCK_M)
    kvh = bkv % HKV
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = q_start + i
    if SINGLE:
        sink = tl.load(S + h, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        m_i = sink
        l_i = tl.where(sink == float("-inf"), 0.0, 1.0)
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    lo = keys_lo + split * chunk
    hi = tl.minimum(lo + chunk, keys_hi)
    acc, l_i, m_i = _online_softmax_keys(acc, l_i, m_i, q, K + b * skb + kvh * skh, V + b * svb + kvh * svh, sks, svs,
                                         offs_d, q_pos, lo, hi, n_k, k_start, window, qk_scale, BLOCK_N, True,
                                         SLIDING, PREC)
    if SINGLE:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(O + b * sob + h[:, None] * soh + i[:, None] * sos + offs_d[None, :],
                 (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(L + (b * HKV * GROUP + h) * n_q + i, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)
    else:
        n_splits = tl.num_programs(0)
        part = (bkv * n_splits + split) * BLOCK_M
        tl.store(PO + (part + rows[:, None]) * D + offs_d[None, :], acc)
        tl.store(PM + part + rows, m_i)
        tl.store(PL + part + rows, l_i)


@triton.jit
def _attn_decode_merge(S, O, L, PO, PM, PL, sob, sos, soh, n_q, n_splits,
                       HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_S: tl.constexpr):
    """Combine the splits of one tile row of one (sequence, kv head): m = max(sink, m_s),
    l = e^(sink−m) + Σ e^(m_s−m)·l_s, out = Σ e^(m_s−m)·acc_s / l (base 2 throughout).
    Grid (B·Hkv, GROUP·n_q): one program per real row, the splits read BLOCK_S at a time as one
    tile, so a long cache's many splits cost a few wide loads, not a serial walk per split."""
    bkv = tl.program_id(0)
    row = tl.program_id(1)
    b, i, h = _packed_query(bkv, row, n_q, HKV, GROUP)
    offs_d = tl.arange(0, D)
    offs_s = tl.arange(0, BLOCK_S)
    base = bkv * n_splits * BLOCK_M + row  # split s of this row: base + s·BLOCK_M
    sink = tl.load(S + h).to(tl.float32) * 1.4426950408889634
    m = sink
    for s0 in range(0, n_splits, BLOCK_S):
        s_ok = s0 + offs_s < n_splits
        m = tl.maximum(m, tl.max(tl.load(PM + base + (s0 + offs_s) * BLOCK_M, mask=s_ok, other=float("-inf")), 0))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l_i = tl.math.exp2(sink - m_use)
    acc = tl.zeros([D], dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        s_ok = s0 + offs_s < n_splits
        part = base + (s0 + offs_s) * BLOCK_M
        w = tl.math.exp2(tl.load(PM + part, mask=s_ok, other=float("-inf")) - m_use)
        l_i += tl.sum(w * tl.load(PL + part, mask=s_ok, other=0.0), 0)
        acc += tl.sum(w[:, None] * tl.load(PO + part[:, None] * D + offs_d[None, :], mask=s_ok[:, None], other=0.0), 0)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(O + b * sob + h * soh + i * sos + offs_d, (acc / l_i).to(O.dtype.element_ty))
    tl.store(L + (b * HKV * GROUP + h) * n_q + i, (m_use + tl.log2(l_i)) * 0.6931471805599453)
