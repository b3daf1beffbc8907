"""Fused attention with sinks, sliding window and GQA in Triton, behind the reference signature
of `model/attention.py: attention` (`backend="fused"`).

Forward: prefill runs one query head per program (`_attention_fwd._attn_fwd`); decode and short
chunks (the group's queries fit one 128-row tile) pack a kv head's query group into one tile so
K/V are read once, and split the keys over programs when there are too few sequences to fill the
GPU, merging the splits by their log-sum-exp (`_attn_decode`, `_attn_decode_merge`). Both return
the log-sum-exp with the sink included. Backward: dQ and dK/dV kernels (`_attention_bwd`), and
dSink_h = −Σ_i p_sink(i)·⟨o_i, dO_i⟩ with p_sink(i) = exp(sink_h − lse_i) in a few torch ops.
Tile sizes come from `CONFIGS`, measured on an H200 by `scripts/tune_attention.py`.
"""
from __future__ import annotations

import functools

import torch
import triton

from ._attention_bwd import _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq
from ._attention_fwd import _attn_decode, _attn_decode_merge, _attn_fwd

LOG2E = 1.4426950408889634
DECODE_MAX_ROWS = 128  # a group's queries (GROUP × Sq) up to this many rows take the packed decode kernel

# Launch parameters per kernel and regime on a GPU, from scripts/tune_attention.py on an H200
# (reports/gpu-2026-12-02-h200/attention-tune.md); the interpreter uses small tiles.
CONFIGS = {
    "prefill": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, SPLIT_MASK=True),
    "prefill_long": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, SPLIT_MASK=True),  # Sq > 8192
    "prefill_window": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, SPLIT_MASK=False),
    "decode": dict(BLOCK_N=128, num_warps=4, num_stages=4),  # BLOCK_M is the packed group's rows (decode-tune.md)
    "decode_merge": dict(BLOCK_S=32, num_warps=2),  # splits read per load in the merge
    "bwd_dq": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "bwd_dkdv": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
}
INTERPRETER = {"prefill": dict(BLOCK_M=32, BLOCK_N=32, SPLIT_MASK=True), "decode": dict(BLOCK_N=32),
               "decode_merge": dict(BLOCK_S=4),  # < the tests' 7 splits: the merge's loop runs
               "bwd_dq": dict(BLOCK_M=32, BLOCK_N=32), "bwd_dkdv": dict(BLOCK_M=32, BLOCK_N=32)}
# split the keys until about this many programs per multiprocessor: with 128-key tiles 4 stages deep
# one program keeps enough loads in flight (reports/gpu-2026-12-04-h200/decode-tune.md)
DECODE_PROGRAMS_PER_SM = 1


def _precision(q: torch.Tensor) -> str:
    """float32 inputs get IEEE float32 products (Triton's GPU default for them is TF32, a 10-bit
    mantissa: a 1e-2 error on scores near 100); bf16/fp16 products are exact in fp32 anyway."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _config(kind: str, on_gpu: bool, overrides: dict | None = None) -> dict:
    if overrides and kind in overrides:
        return dict(overrides[kind])
    if not on_gpu:
        return dict(INTERPRETER[kind.split("_")[0] if kind.startswith("prefill") else kind])
    return dict(CONFIGS[kind])


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessor_count(index)


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_shapes(q, k, v):
    if q.shape[-2] % k.shape[-2] or k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not fit")


def attention_forward(q, k, v, sinks, *, window, q_start=0, k_start=0, path=None, overrides=None):
    """Returns (out [B, Sq, Hq, D] in q's dtype, lse [B, Hq, Sq] float32 with the sink included).

    `path` forces "prefill" or "decode" (tests, benchmarks); by default a group's queries that fit
    one tile go to decode. `overrides` replaces entries of CONFIGS (the tuning script)."""
    _check_shapes(q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, sq, hq, d = q.shape
    group = hq // k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    if sq == 0:
        return out, lse
    if path is None:
        path = "decode" if group * sq <= DECODE_MAX_ROWS else "prefill"
    run = _decode if path == "decode" else _prefill
    run(q, k, v, sinks, out, lse, window=window, q_start=q_start, k_start=k_start, overrides=overrides)
    return out, lse


def _strides(q, k, v, out):
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2))


def _prefill(q, k, v, sinks, out, lse, *, window, q_start, k_start, overrides):
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    kind = "prefill_window" if window else ("prefill_long" if sq > 8192 else "prefill")
    cfg = _config(kind, q.is_cuda, overrides)
    grid = (b * hq, triton.cdiv(sq, cfg["BLOCK_M"]))
    _attn_fwd[grid](q, k, v, sinks, out, lse, *_strides(q, k, v, out),
                    sq, sk, q_start, k_start, window or 0, d ** -0.5 * LOG2E,
                    HQ=hq, GROUP=hq // hkv, D=d, SLIDING=window is not None, PREC=_precision(q), **cfg)


def decode_splits(batch_kv: int, keys: int, block_n: int, programs: int) -> tuple[int, int]:
    """(splits, chunk): split `keys` into chunks (multiples of block_n, at least 4 blocks), as many
    as keep batch_kv · splits within `programs` (one wave: at one resident program per SM, 136
    programs on 132 SMs run as two waves, the second nearly empty, 25 % slower on the H200)."""
    if keys <= 0:
        return 1, block_n
    splits = max(1, min(programs // batch_kv, triton.cdiv(keys, 4 * block_n)))
    chunk = triton.cdiv(triton.cdiv(keys, splits), block_n) * block_n
    return triton.cdiv(keys, chunk), chunk


def _decode(q, k, v, sinks, out, lse, *, window, q_start, k_start, overrides):
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    cfg = _config("decode", q.is_cuda, overrides)
    block_n = cfg["BLOCK_N"]
    block_m = max(16, triton.next_power_of_2(group * sq))
    keys_hi = max(min(q_start + sq - k_start, sk), 0)
    keys_lo = 0 if window is None else max(q_start - window + 1 - k_start, 0) // block_n * block_n
    keys_lo = min(keys_lo, keys_hi)
    programs = DECODE_PROGRAMS_PER_SM * (_multiprocessors(q.device) if q.is_cuda else 2)
    n_splits, chunk = decode_splits(b * hkv, keys_hi - keys_lo, block_n, programs)
    if overrides and "decode_splits" in overrides:
        n_splits = overrides["decode_splits"]
        chunk = triton.cdiv(triton.cdiv(max(keys_hi - keys_lo, 1), n_splits), block_n) * block_n
    single = n_splits == 1
    if single:
        part_o = part_m = part_l = lse  # not read: the kernel stores the final output itself
    else:
        part_o = torch.empty((b * hkv, n_splits, block_m, d), device=q.device, dtype=torch.float32)
        part_m = torch.empty((b * hkv, n_splits, block_m), device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
    scale = d ** -0.5 * LOG2E
    _attn_decode[(n_splits, b * hkv)](q, k, v, sinks, out, lse, part_o, part_m, part_l, *_strides(q, k, v, out),
                                      sq, sk, q_start, k_start, window or 0, scale, keys_lo, keys_hi, chunk,
                                      HKV=hkv, GROUP=group, D=d, BLOCK_M=block_m, SLIDING=window is not None,
                                      SINGLE=single, PREC=_precision(q), **cfg)
    if not single:
        merge = _config("decode_merge", q.is_cuda, overrides)
        _attn_decode_merge[(b * hkv, group * sq)](sinks, out, lse, part_o, part_m, part_l, out.stride(0),
                                                  out.stride(1), out.stride(2), sq, n_splits, HKV=hkv, GROUP=group,
                                                  D=d, BLOCK_M=block_m, **merge)


def attention_backward(q, k, v, sinks, out, lse, d_out, *, window, q_start, k_start, overrides=None):
    """(dq, dk, dv, dsinks). dsink_h = −Σ_i p_sink(i)·⟨o_i, dO_i⟩ with p_sink(i) = exp(sink_h − lse_i)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    q, k, v, d_out = (t.contiguous() for t in (q, k, v, d_out))  # the kernels take dO and dQ in q's strides
    out = out.contiguous()
    delta = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    _attn_bwd_delta[(b * hq, triton.cdiv(sq, 64))](out, d_out, delta, out.stride(0), out.stride(1), out.stride(2), sq,
                                                   HQ=hq, D=d, BLOCK_M=64)
    p_sink = torch.exp(sinks.float()[None, :, None] - lse)
    d_sinks = -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), sq, sk, q_start, k_start, window or 0, d ** -0.5)
    common = dict(GROUP=hq // hkv, D=d, SLIDING=window is not None, PREC=_precision(q))
    cfg = _config("bwd_dq", q.is_cuda, overrides)
    _attn_bwd_dq[(b * hq, triton.cdiv(sq, cfg["BLOCK_M"]))](q, k, v, d_out, lse, delta, dq, *args, HQ=hq, **common,
                                                             **cfg)
    cfg = _config("bwd_dkdv", q.is_cuda, overrides)
    _attn_bwd_dkdv[(b * hkv, triton.cdiv(sk, cfg["BLOCK_N"]))](q, k, v, d_out, lse, delta, dk, dv, *args, HKV=hkv,
                                                                **common, **cfg)
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
