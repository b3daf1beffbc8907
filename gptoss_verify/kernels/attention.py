"""Fused attention with sinks, sliding window and GQA in Triton (forward), behind the reference
signature of `model/attention.py: attention`.

Online softmax with the sink folded in: the running max starts at the head's sink logit and the
running denominator at exp(sink − max) = 1, so the sink takes part in the max subtraction and in
the denominator but contributes no value row. Key blocks wholly outside `q_pos − W < k_pos ≤ q_pos`
are never visited. GQA: each program handles one query head and reads its kv head's K/V in place.
The backward is two Triton kernels (dQ per query block; dK and dV per key block over the GROUP
query heads, so no atomics); dSink_h = −Σ_i p_sink(i)·⟨o_i, dO_i⟩ comes from the saved
log-sum-exp (sink included) in a few torch ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _key_range(pid_m, n_q, n_k, q_start, k_start, window,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr):
    """[lo, hi): the keys that query block pid_m can see, lo rounded down to a key block."""
    last_q = tl.minimum(q_start + pid_m * BLOCK_M + BLOCK_M - 1, q_start + n_q - 1)
    hi = tl.minimum(last_q - k_start + 1, n_k)
    lo = 0
    if SLIDING:
        lo = tl.maximum(q_start + pid_m * BLOCK_M - window + 1 - k_start, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _visible(q_pos, offs_n, n_k, k_start, window, SLIDING: tl.constexpr):
    """[M, N] mask: key j visible from query i iff q_pos − W < k_pos ≤ q_pos (and j < n_k)."""
    k_pos = k_start + offs_n
    visible = (k_pos[None, :] <= q_pos[:, None]) & (offs_n[None, :] < n_k)
    if SLIDING:
        visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
    return visible


@triton.jit
def _attn_fwd(Q, K, V, S, O, L,
              sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
              n_q, n_k, q_start, k_start, window, scale,
              HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr,
              PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=offs_m[:, None] < n_q, other=0.0)
    q_pos = q_start + offs_m
    sink = tl.load(S + h).to(tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.where(sink == float("-inf"), 0.0, 1.0)  # exp(sink − m)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    lo, hi = _key_range(pid_m, n_q, n_k, q_start, k_start, window, BLOCK_M, BLOCK_N, SLIDING)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = offs_n[:, None] < n_k
        k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        visible = _visible(q_pos, offs_n, n_k, k_start, window, SLIDING)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet (sink −inf)
        p = tl.exp(qk - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past the end with a −inf sink: nothing to divide
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=offs_m[:, None] < n_q)
    tl.store(L + bh * n_q + offs_m, m_i + tl.log(l_i), mask=offs_m < n_q)


def attention_forward(q, k, v, sinks, *, window, q_start=0, k_start=0):
    """Returns (out [B, Sq, Hq, D] in q's dtype, lse [B, Hq, Sq] float32 with the sink included)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if hq % hkv or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not fit")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    if sq == 0:
        return out, lse
    block_m, block_n, warps, stages = _forward_config(sq, q.is_cuda)
    grid = (triton.cdiv(sq, block_m), b * hq)
    _attn_fwd[grid](q, k, v, sinks, out, lse,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                    sq, sk, q_start, k_start, window or 0, d ** -0.5,
                    HQ=hq, GROUP=hq // hkv, D=d, BLOCK_M=block_m, BLOCK_N=block_n, SLIDING=window is not None,
                    PREC=_precision(q), num_warps=warps, num_stages=stages)
    return out, lse


def _precision(q: torch.Tensor) -> str:
    """float32 inputs get IEEE float32 products (Triton's default for them on a GPU is TF32, a
    10-bit mantissa: a 1e-2 error on scores near 100); bf16/fp16 products are exact in fp32 anyway."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _forward_config(sq: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages): 128×64 tiles with 8 warps for long prefill on a GPU,
    the smallest tile tl.dot accepts for decode, small tiles under the interpreter."""
    if not on_gpu:
        return (64 if sq >= 64 else max(16, triton.next_power_of_2(sq))), 64, 4, 1
    if sq >= 128:
        return 128, 64, 8, 3
    return max(16, triton.next_power_of_2(sq)), 64, 4, 3


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, L, DELTA, DQ,
                 sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
                 n_q, n_k, q_start, k_start, window, scale,
                 HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr,
              PREC: tl.constexpr):
    """dQ_i = scale · Σ_j P_ij (dO_i·V_j − δ_i) K_j over the keys query i sees (δ_i = O_i·dO_i)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_mask = offs_m[:, None] < n_q
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=row_mask, other=0.0)
    lse = tl.load(L + bh * n_q + offs_m, mask=offs_m < n_q, other=0.0)
    delta = tl.load(DELTA + bh * n_q + offs_m, mask=offs_m < n_q, other=0.0)
    q_pos = q_start + offs_m
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    lo, hi = _key_range(pid_m, n_q, n_k, q_start, k_start, window, BLOCK_M, BLOCK_N, SLIDING)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = offs_n[:, None] < n_k
        k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        visible = _visible(q_pos, offs_n, n_k, k_start, window, SLIDING)
        p = tl.where(visible, tl.exp(tl.dot(q, tl.trans(k), input_precision=PREC) * scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_mask)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, L, DELTA, DK, DV,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
                   n_q, n_k, q_start, k_start, window, scale,
                   HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr,
              PREC: tl.constexpr):
    """dV_j = Σ_i P_ij dO_i and dK_j = scale · Σ_i dS_ij Q_i over the GROUP query heads of this kv
    head and the queries that see key j; one program owns its keys, so no atomics."""
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1)
    b = bkv // HKV
    kvh = bkv % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_mask = offs_n[:, None] < n_k
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    # queries that can see this key block: q_pos >= first key; with a window, q_pos < last key + W
    lo = tl.maximum(k_start + pid_n * BLOCK_N - q_start, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = n_q
    if SLIDING:
        hi = tl.minimum(k_start + pid_n * BLOCK_N + BLOCK_N - 1 + window - q_start, n_q)
    for g in range(GROUP):
        h = kvh * GROUP + g
        bh = b * (HKV * GROUP) + h
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_mask = offs_m[:, None] < n_q
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=row_mask, other=0.0)
            do = tl.load(DO + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=row_mask, other=0.0)
            lse = tl.load(L + bh * n_q + offs_m, mask=offs_m < n_q, other=0.0)
            delta = tl.load(DELTA + bh * n_q + offs_m, mask=offs_m < n_q, other=0.0)
            q_pos = q_start + offs_m
            visible = _visible(q_pos, offs_n, n_k, k_start, window, SLIDING) & (offs_m[:, None] < n_q)
            p = tl.where(visible, tl.exp(tl.dot(q, tl.trans(k), input_precision=PREC) * scale - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    tl.store(DK + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


def attention_backward(q, k, v, sinks, out, lse, d_out, *, window, q_start, k_start):
    """(dq, dk, dv, dsinks). dsink_h = −Σ_i p_sink(i)·⟨o_i, dO_i⟩ with p_sink(i) = exp(sink_h − lse_i)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    d_out = d_out.contiguous()
    delta = (out.float() * d_out.float()).sum(-1).permute(0, 2, 1).contiguous()  # [B, Hq, Sq]
    p_sink = torch.exp(sinks.float()[None, :, None] - lse)
    d_sinks = -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    block_m, block_n = 32, 32
    args = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), sq, sk, q_start, k_start, window or 0, d ** -0.5)
    _attn_bwd_dq[(triton.cdiv(sq, block_m), b * hq)](q, k, v, d_out, lse, delta, dq, *args, HQ=hq, GROUP=hq // hkv,
                                                      D=d, BLOCK_M=block_m, BLOCK_N=block_n,
                                                      SLIDING=window is not None, PREC=_precision(q))
    _attn_bwd_dkdv[(triton.cdiv(sk, block_n), b * hkv)](q, k, v, d_out, lse, delta, dk, dv, *args, HKV=hkv,
                                                         GROUP=hq // hkv, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
                                                         SLIDING=window is not None, PREC=_precision(q))
    return dq, dk, dv, d_sinks


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, window, q_start, k_start):
        out, lse = attention_forward(q, k, v, sinks, window=window, q_start=q_start, k_start=k_start)
        ctx.save_for_backward(q, k, v, sinks, out, lse)
        ctx.args = (window, q_start, k_start)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, sinks, out, lse = ctx.saved_tensors
        window, q_start, k_start = ctx.args
        dq, dk, dv, ds = attention_backward(q, k, v, sinks, out, lse, d_out, window=window, q_start=q_start,
                                            k_start=k_start)
        return dq, dk, dv, ds, None, None, None


def fused_attention(q, k, v, sinks, *, window, q_start=0, k_start=0):
    """The reference signature (`model/attention.py: attention`), computed by the Triton kernels."""
    if q.dtype == torch.float64:
        raise ValueError("fused_attention: float64 is not supported (use the reference backend)")
    return _FusedAttention.apply(q, k, v, sinks, window, int(q_start), int(k_start))
