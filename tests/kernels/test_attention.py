"""The fused attention kernels against the float64 reference: forward and backward (dQ, dK, dV,
dSink), over windows, sink magnitudes, GQA ratios, offsets against a cache and ragged lengths.

On CPU the kernels run under the Triton interpreter (float32, float16); on a GPU the same grid
runs in bf16 and fp16 at realistic shapes (`gpu` mark). The rule is the truth rule: the fused
path's error against float64 is at most 2x the reference path's own error in the same dtype,
plus a small floor.
"""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.kernels.attention import fused_attention
from gptoss_verify.model.attention import attention

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (batch, sq, sk, hq, hkv, d, window, q_start, k_start)
SMALL = [
    (2, 37, 37, 8, 2, 16, 16, 0, 0),          # prefill longer than the window, GQA 4
    (1, 5, 40, 4, 4, 32, None, 35, 0),        # chunk against a cache, no GQA, full causal
    (1, 70, 70, 8, 1, 16, 8, 4090, 4090),     # GQA 8, positions past 4096
    (2, 3, 20, 8, 2, 16, 16, 100, 83),        # decode-like: a windowed cache starting at 83
    (1, 1, 33, 4, 2, 64, None, 32, 0),        # one query, head_dim 64
]


def _inputs(shape, dtype, sink_scale, seed=0):
    b, sq, sk, hq, hkv, d, *_ = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=gen) for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    sinks = torch.randn(hq, generator=gen) * sink_scale
    d_out = torch.randn(b, sq, hq, d, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v, sinks)], d_out.to(DEVICE, dtype)


def _grads(fn, tensors, d_out, shape):
    *_, window, q_start, k_start = shape
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves, window=window, q_start=q_start, k_start=k_start)
    out.backward(d_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _check(shape, dtype, sink_scale):
    tensors, d_out = _inputs(shape, dtype, sink_scale)
    truth = _grads(attention, [t.double() for t in tensors], d_out.double(), shape)
    ours = _grads(fused_attention, tensors, d_out, shape)
    ref = _grads(attention, tensors, d_out, shape)
    for name, t, o, r in zip(["out", "dq", "dk", "dv", "dsink"], truth, ours, ref):
        err = (o.double() - t).abs().max().item()
        ref_err = (r.double() - t).abs().max().item()
        scale = t.abs().max().item()
        assert err <= 2 * ref_err + FLOOR[dtype] * max(scale, 1.0), (name, err, ref_err)


@pytest.mark.parametrize("sink_scale", [5.0, 20.0])
@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_attention_small(shape, dtype, sink_scale):
    _check(shape, dtype, sink_scale)


def test_huge_sinks_stay_finite():
    shape = SMALL[0]
    tensors, _ = _inputs(shape, torch.float32, 1.0)
    for value in (30.0, -30.0, 100.0):
        tensors[3] = torch.full_like(tensors[3], value)
        out = fused_attention(*tensors, window=shape[6])
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), attention(*[t.double() for t in tensors], window=shape[6]),
                                   atol=1e-5, rtol=1e-4)


def test_float64_refused():
    q = torch.zeros(1, 2, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        fused_attention(q, q, q, torch.zeros(2, dtype=torch.float64), window=None)


REALISTIC = [
    (1, 4096, 4096, 64, 8, 64, 128, 0, 0),
    (1, 4096, 4096, 64, 8, 64, None, 0, 0),
    (2, 1000, 1000, 64, 8, 64, 128, 3000, 3000),
    (4, 3, 8195, 64, 8, 64, None, 8192, 0),      # decode against a long cache
    (4, 1, 127, 64, 8, 64, 128, 9000, 8874),     # decode against a windowed cache
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", REALISTIC)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_attention_realistic(shape, dtype):
    _check(shape, dtype, 10.0)
