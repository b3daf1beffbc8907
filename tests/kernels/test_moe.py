"""The fused MoE (kernels/moe.py) against the float64 reference, under the Triton interpreter on CPU
(float32/float16, tiny shapes) or on a GPU when there is one.

The truth rule (kind `moe-kernel` of the one judge): the fused error against the float64 reference
is at most twice the reference path's own error in the same dtype, plus a small floor; outputs are
compared only on tokens whose top-k expert set agrees among fused, reference and truth (routing ties
are implementation-defined), and that agreement must hold for a large majority of tokens (kind
`moe-kernel-routing`).
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from gptoss_verify.formats import mxfp4
from gptoss_verify.judge import check, verdict
from gptoss_verify.kernels.moe import fused_moe, fused_moe_mxfp4
from gptoss_verify.kernels.mxfp4 import decode_tile
from gptoss_verify.metrics import same_expert_set
from gptoss_verify.model.moe import moe

ALPHA, LIMIT = 1.702, 7.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_layer(t, hidden, inter, experts, *, seed, device=DEVICE, skew=False):
    """Float32 tensors (bf16-representable) whose gate/up pre-activations pass ±7 on a good share."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).bfloat16().float().to(device)

    h = rnd(t, hidden)
    router_w = rnd(experts, hidden, std=hidden ** -0.5)
    router_b = rnd(experts, std=0.5)
    if skew:  # most slots on experts 0..3 (groups spanning several row blocks), some experts empty
        router_b = router_b + torch.tensor([4.0] * 4 + [0.0] * (experts - 4), device=device)
    gate_up = rnd(experts, hidden, 2 * inter, std=5.0 * hidden ** -0.5)
    gate_up_b = rnd(experts, 2 * inter)
    down = rnd(experts, inter, hidden, std=0.5 * inter ** -0.5)
    down_b = rnd(experts, hidden, std=0.5)
    return h, router_w, router_b, gate_up, gate_up_b, down, down_b


def clamp_share(h, gate_up, gate_up_b):
    """Share of gate/up pre-activations beyond ±LIMIT (over all experts)."""
    pre = torch.einsum("th,ehn->etn", h.double(), gate_up.double()) + gate_up_b.double()[:, None, :]
    return (pre.abs() > LIMIT).double().mean().item()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_truth_rule(fused, ref, truth, label=""):
    """Assert the 2x rule on out, router logits and weights; return the measured numbers."""
    dtype = fused[0].dtype
    agree = same_expert_set(fused[2], truth[2]) & same_expert_set(ref[2], truth[2])
    share = agree.double().mean().item()
    routing = verdict("moe-kernel-routing", dtype, share)
    assert routing.passed, f"{label}: top-k sets agree on only {share:.3f} of tokens ({routing})"
    numbers = {"agree": share}
    for name, i in (("out", 0), ("logits", 1), ("weights", 3)):
        if name == "logits":
            v = check("moe-kernel", dtype, fused[1], truth[1], ref[1])
        else:
            fv, rv, tv = fused[i][agree], ref[i][agree], truth[i][agree]
            if name == "weights":  # order within a tied set may differ: compare by expert
                fv = fv.gather(-1, fused[2][agree].argsort(-1))
                rv = rv.gather(-1, ref[2][agree].argsort(-1))
                tv = tv.gather(-1, truth[2][agree].argsort(-1))
            v = check("moe-kernel", dtype, fv, tv, rv)
        numbers[name] = (v.error, v.reference)
        assert v.passed, f"{label} {name}: {v}"
    return numbers


def run_all(layer, dtype, mx=None):
    """(fused, reference in dtype, float64 truth) on the same layer (dense, or MXFP4 blocks/scales)."""
    h, rw, rb, gu, gub, dn, dnb = layer
    low = [x.to(dtype) for x in (h, rw, rb, gub, dnb)]
    if mx is None:
        gu_low, dn_low = gu.to(dtype), dn.to(dtype)
        fused = fused_moe(low[0], low[1], low[2], gu_low, low[3], dn_low, low[4], k=4, alpha=ALPHA, limit=LIMIT)
        gu64, dn64 = gu.double(), dn.double()
    else:
        gb, gs, db, ds = mx
        fused = fused_moe_mxfp4(low[0], low[1], low[2], gb, gs, low[3], db, ds, low[4], k=4, alpha=ALPHA, limit=LIMIT)
        gu_low, dn_low = mxfp4.to_hf_dense(gb, gs, dtype), mxfp4.to_hf_dense(db, ds, dtype)
        gu64, dn64 = mxfp4.to_hf_dense(gb, gs, torch.float64), mxfp4.to_hf_dense(db, ds, torch.float64)
    ref = moe(low[0], low[1], low[2], gu_low, low[3], dn_low, low[4], k=4, alpha=ALPHA, limit=LIMIT)
    truth = moe(h.double(), rw.double(), rb.double(), gu64, gub.double(), dn64, dnb.double(), k=4,
                alpha=ALPHA, limit=LIMIT)
    return fused, ref, truth


DENSE_INPUTS = ("h", "router_weight", "router_bias", "gate_up", "gate_up_bias", "down", "down_bias")
FROZEN_EXPERTS = ("h", "router_weight", "router_bias", "gate_up_bias", "down_bias")  # MXFP4: experts frozen


def check_gradient_truth_rule(layer, dtype, mx=None, label="", seed=0):
    """The 2x rule on the gradient of every trainable input (MXFP4: h, the router and the biases): the
    fused backward and the reference path's autograd in `dtype`, each against the float64 truth's
    autograd on the same inputs. The loss Σ out·G + Σ weights·G_w[expert] + Σ logits·G_l puts zero
    upstream gradient on the outputs and weights of tokens whose expert set differs among the three
    (near-ties, left out as in the forward rule), so those tokens reach no expert gradient on any side;
    G_w is indexed by expert, so the order within a set does not matter. Returns the numbers."""
    low = [None if x is None else x.to(dtype) for x in layer]  # MXFP4: gate_up, down from mx
    if mx is None:
        wide = [x.double() for x in low]
        trainable = DENSE_INPUTS
    else:
        low[3], low[5] = mxfp4.to_hf_dense(mx[0], mx[1], dtype), mxfp4.to_hf_dense(mx[2], mx[3], dtype)
        wide = [x.double() for x in low]
        wide[3], wide[5] = mxfp4.to_hf_dense(mx[0], mx[1], torch.float64), mxfp4.to_hf_dense(mx[2], mx[3], torch.float64)
        trainable = FROZEN_EXPERTS

    def leaves(xs):
        return {n: x.detach().clone().requires_grad_(n in trainable) for n, x in zip(DENSE_INPUTS, xs)}

    fused_in, ref_in, truth_in = leaves(low), leaves(low), leaves(wide)
    f = fused_in
    if mx is None:
        fused = fused_moe(*f.values(), k=4, alpha=ALPHA, limit=LIMIT)
    else:
        fused = fused_moe_mxfp4(f["h"], f["router_weight"], f["router_bias"], mx[0], mx[1], f["gate_up_bias"], mx[2],
                                mx[3], f["down_bias"], k=4, alpha=ALPHA, limit=LIMIT)
    ref = moe(*ref_in.values(), k=4, alpha=ALPHA, limit=LIMIT)
    truth = moe(*truth_in.values(), k=4, alpha=ALPHA, limit=LIMIT)
    agree = same_expert_set(fused[2], truth[2]) & same_expert_set(ref[2], truth[2])
    share = agree.double().mean().item()
    assert verdict("moe-kernel-routing", dtype, share).passed, f"{label}: top-k sets agree on only {share:.3f}"
    t, hid = low[0].shape
    e = low[1].shape[0]
    gen = torch.Generator().manual_seed(seed)
    keep = agree.cpu().double()[:, None]
    g_out = torch.randn(t, hid, generator=gen, dtype=torch.float64) * keep
    g_w = torch.randn(t, e, generator=gen, dtype=torch.float64) * keep
    g_l = torch.randn(t, e, generator=gen, dtype=torch.float64)
    for (out, logits, idx, weights), x in ((fused, low[0]), (ref, low[0]), (truth, wide[0])):
        upstream = [g.to(device=x.device, dtype=x.dtype) for g in (g_out, g_w, g_l)]
        ((out * upstream[0]).sum() + (weights * upstream[1].gather(1, idx)).sum()
         + (logits * upstream[2]).sum()).backward()
    numbers = {"agree": share}
    for name in trainable:
        v = check("moe-kernel-grad", dtype, fused_in[name].grad, truth_in[name].grad, ref_in[name].grad)
        numbers[name] = (v.error, v.reference)
        assert v.passed, f"{label} d{name}: {v}"
    return numbers


DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [1, 7, 37])
def test_dense_truth_rule(t, dtype):
    layer = make_layer(t, 64, 96, 8, seed=t)
    assert clamp_share(*(layer[i] for i in (0, 3, 4))) > 0.05
    fused, ref, truth = run_all(layer, dtype)
    assert fused[0].dtype == fused[1].dtype == fused[3].dtype == dtype and fused[2].dtype == torch.int64
    check_truth_rule(fused, ref, truth, f"dense t={t} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("t", [1, 4, 21])  # 1 and 4: T·k <= 16, the slot GEMVs
def test_mxfp4_truth_rule(t, dtype):
    layer = make_layer(t, 64, 96, 8, seed=5 + t)
    gb, gs = mxfp4.from_hf_dense(layer[3].cpu())
    db, ds = mxfp4.from_hf_dense(layer[5].cpu())
    mx = tuple(x.to(DEVICE) for x in (gb, gs, db, ds))
    fused, ref, truth = run_all(layer, dtype, mx)
    check_truth_rule(fused, ref, truth, f"mxfp4 {dtype}")


@pytest.mark.parametrize("t", [5, 17])  # 5: the router as GEMVs (T <= 16); 17: the tiled router GEMM
def test_router_over_wide_hidden_truth_rule(t):
    """H = 2112: the router GEMVs' three 1024-wide chunks with a ragged last one, and 12 experts (a
    partial last tile of experts in both router kernels)."""
    layer = make_layer(t, 2112, 32, 12, seed=40 + t)
    fused, ref, truth = run_all(layer, DTYPES[-1])
    check_truth_rule(fused, ref, truth, f"router H=2112 t={t}")


def test_mxfp4_equals_dense_on_decoded_weights():
    """The in-loop decode gives the same function as the dense kernel on the decoded experts."""
    h, rw, rb, gu, gub, dn, dnb = make_layer(9, 64, 96, 8, seed=11)
    gb, gs = mxfp4.from_hf_dense(gu.cpu())
    db, ds = mxfp4.from_hf_dense(dn.cpu())
    gb, gs, db, ds = (x.to(DEVICE) for x in (gb, gs, db, ds))
    a = fused_moe_mxfp4(h, rw, rb, gb, gs, gub, db, ds, dnb, k=4, alpha=ALPHA, limit=LIMIT)
    b = fused_moe(h, rw, rb, mxfp4.to_hf_dense(gb, gs, torch.float32), gub, mxfp4.to_hf_dense(db, ds, torch.float32),
                  dnb, k=4, alpha=ALPHA, limit=LIMIT)
    assert torch.equal(a[2], b[2])
    assert rel(a[0], b[0]) < 1e-6


@triton.jit
def _decode_kernel(p_ptr, s_ptr, o_ptr, BN: tl.constexpr, BK: tl.constexpr):
    n = tl.arange(0, BN)
    packed = tl.load(p_ptr + n[:, None] * (BK // 2) + tl.arange(0, BK // 2)[None, :])
    scales = tl.load(s_ptr + n[:, None] * (BK // 32) + tl.arange(0, BK // 32)[None, :])
    tl.store(o_ptr + n[:, None] * BK + tl.arange(0, BK)[None, :], decode_tile(packed, scales, BN, BK))


def test_decode_tile_exact_for_every_byte():
    """Every byte value decodes as the codec does (low nibble first), at scale bytes up to the
    supported extremes 2 and 252."""
    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 1, 16).expand(16, 4, 16).contiguous()
    scales = torch.tensor([2, 100, 127, 252], dtype=torch.uint8).repeat(16, 1)
    expect = mxfp4.decode(blocks, scales, torch.float32)
    got = torch.empty(16, 128, device=DEVICE)
    _decode_kernel[(1,)](blocks.to(DEVICE), scales.to(DEVICE), got, BN=16, BK=128)
    assert torch.equal(got.cpu(), expect)
    assert torch.equal(torch.signbit(got.cpu()), torch.signbit(expect))


def test_skewed_routing_spans_blocks_and_empty_experts():
    """Groups larger than one row block and experts with no tokens go through the align step."""
    layer = make_layer(40, 64, 96, 8, seed=3, skew=True)
    fused, ref, truth = run_all(layer, torch.float32)
    counts = torch.bincount(fused[2].flatten().cpu(), minlength=8)
    assert counts.max() > 16 and (counts == 0).any()
    check_truth_rule(fused, ref, truth, "skewed")


def test_routing_outputs_are_consistent():
    """Indices sorted by descending logit, weights = softmax over the chosen logits, sum to 1."""
    h, rw, rb, gu, gub, dn, dnb = make_layer(17, 64, 96, 8, seed=2)
    out, logits, idx, w = fused_moe(h, rw, rb, gu, gub, dn, dnb, k=4, alpha=ALPHA, limit=LIMIT)
    chosen = logits.gather(-1, idx)
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()
    others = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True), float("-inf"))
    assert (others.max(-1).values <= chosen[:, -1]).all()
    torch.testing.assert_close(w, chosen.double().softmax(-1).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.sum(-1), torch.ones(17, device=DEVICE))


def test_inputs_untouched_and_deterministic():
    layer = make_layer(23, 64, 96, 8, seed=4)
    before = [x.clone() for x in layer]
    a = fused_moe(*layer, k=4, alpha=ALPHA, limit=LIMIT)
    b = fused_moe(*layer, k=4, alpha=ALPHA, limit=LIMIT)
    for x, y in zip(layer, before):
        assert torch.equal(x, y)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.isfinite(a[0]).all()


def test_backward_with_fewer_tokens_than_experts():
    """Six tokens over eight experts (some experts get no rows): every input's gradient passes the 2x
    rule against the float64 truth, judged by the one judge (this test once compared the fused and
    reference float32 gradients with its own tolerance and an unseeded upstream gradient, which
    float32 reordering on gradients of size ~50 failed at random)."""
    check_gradient_truth_rule(make_layer(6, 64, 96, 8, seed=8), torch.float32, None, "T=6 < E=8", seed=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", ["dense", "mxfp4"])
def test_backward_gradient_truth_rule(fmt, dtype):
    """The fused backward (dact with the clamped-SwiGLU derivative, expert weight and bias gradients, dX,
    the router backward) passes the 2x rule against the float64 truth on every input's gradient."""
    layer = make_layer(37, 64, 96, 8, seed=21)
    assert clamp_share(*(layer[i] for i in (0, 3, 4))) > 0.05
    mx = None
    if fmt == "mxfp4":
        gb, gs = mxfp4.from_hf_dense(layer[3].cpu())
        db, ds = mxfp4.from_hf_dense(layer[5].cpu())
        mx = tuple(x.to(DEVICE) for x in (gb, gs, db, ds))
    check_gradient_truth_rule(layer, dtype, mx, f"backward {fmt} {dtype}", seed=3)


def test_backward_ragged_hidden_size():
    """H = 80, not a multiple of the backward's K step or column tiles: the dact GEMM's masked K loop,
    ragged column tiles in dx_slot, the gathers and the bias sums; the gradient truth rule holds."""
    from gptoss_verify.kernels import moe as kmoe
    cfg = kmoe.choose_backward_config()
    assert 80 % cfg.block_k and 80 % cfg.block_n and 80 % cfg.bias_n
    layer = make_layer(29, 80, 96, 8, seed=9)
    check_gradient_truth_rule(layer, torch.float32, None, "backward, H = 80", seed=11)


def test_backward_wide_row_blocks_and_empty_experts(monkeypatch):
    """The backward's row-block passes (bias sums per row block, then per expert over its blocks in
    order; the SwiGLU backward over sub-blocks of rows) with row blocks wider than their row tiles:
    groups ragged over several blocks, row tiles that are all padding, experts without rows. The
    gradient truth rule holds there, and the gradients equal those at narrow blocks and of a repeat up
    to float32 summation order (bitwise for those summed in a fixed order: h and the router; the expert
    sums follow the rows' order inside a group, which on a GPU follows the integer atomics)."""
    from dataclasses import replace

    from gptoss_verify.kernels import moe as kmoe
    layer = make_layer(70, 64, 96, 8, seed=5, skew=True)
    base = kmoe.choose_config
    gen = torch.Generator().manual_seed(6)
    g_out = torch.randn(70, 64, generator=gen).to(DEVICE)
    g_w = torch.randn(70, 4, generator=gen).to(DEVICE)

    def grads(bm):
        monkeypatch.setattr(kmoe, "choose_config", lambda *a, **kw: replace(base(*a, **kw), block_m=bm))
        leaves = [x.clone().requires_grad_() for x in layer]
        out, _, idx, w = fused_moe(*leaves, k=4, alpha=ALPHA, limit=LIMIT)
        ((out * g_out).sum() + (w * g_w).sum()).backward()
        return [x.grad for x in leaves], idx

    narrow, idx = grads(16)
    wide, idx_wide = grads(64)
    again, _ = grads(64)
    counts = torch.bincount(idx.flatten().cpu(), minlength=8)
    assert torch.equal(idx, idx_wide)
    assert counts.max() > 64 and (counts[counts > 0] % 64 != 0).all() and (counts == 0).any(), counts
    for name, a, b, c in zip(DENSE_INPUTS, narrow, wide, again):
        assert rel(b, a) < 1e-5, name
        assert rel(c, b) < 1e-5, name
        if name in ("h", "router_weight", "router_bias"):
            assert torch.equal(b, c), name
    check_gradient_truth_rule(layer, torch.float32, None, "backward, 64-row blocks, skewed", seed=7)


@pytest.mark.parametrize("bad, message", [
    (lambda l: (l[0][:, :32],) + l[1:], "router_weight"),
    (lambda l: l[:3] + (l[3][:, :, :-1],) + l[4:], "gate_up"),
    (lambda l: l[:5] + (l[5][:, :-1],) + l[6:], "down"),
    (lambda l: l[:6] + (l[6][:, :-1],), "down_bias"),
    (lambda l: (l[0].double(),) + l[1:], "h"),
])
def test_bad_input_names_the_tensor(bad, message):
    layer = make_layer(3, 64, 96, 8, seed=1)
    with pytest.raises(ValueError, match=message):
        fused_moe(*bad(layer), k=4, alpha=ALPHA, limit=LIMIT)


def test_mxfp4_bad_scales_shape():
    h, rw, rb, gu, gub, dn, dnb = make_layer(3, 64, 96, 8, seed=1)
    gb, gs = mxfp4.from_hf_dense(gu.cpu())
    db, ds = mxfp4.from_hf_dense(dn.cpu())
    with pytest.raises(ValueError, match="down_scales"):
        fused_moe_mxfp4(h, rw, rb, gb.to(DEVICE), gs.to(DEVICE), gub, db.to(DEVICE), ds[:, :-1].to(DEVICE), dnb,
                        k=4, alpha=ALPHA, limit=LIMIT)


def test_mxfp4_dot_scaled_equals_own_decode():
    """Triton's tl.dot_scaled and our decode_tile read the checkpoint bytes the same way (fp16 here),
    also split over K."""
    from dataclasses import replace

    from gptoss_verify.kernels import moe as kmoe
    h, rw, rb, gu, gub, dn, dnb = (x.half() for x in make_layer(9, 64, 96, 8, seed=12))
    gb, gs = mxfp4.from_hf_dense(gu.float().cpu())
    db, ds = mxfp4.from_hf_dense(dn.float().cpu())
    gb, gs, db, ds = (x.to(DEVICE) for x in (gb, gs, db, ds))
    base = kmoe.choose_config(9, 8, 4, mxfp4=True)
    configs = (replace(base, dot_scaled=True), replace(base, dot_scaled=False), replace(base, split_k=2))
    outs = [kmoe._forward(h, rw, rb, gb, gs, gub, db, ds, dnb, 4, ALPHA, LIMIT, 96, True, c) for c in configs]
    for other in outs[1:]:
        assert torch.equal(outs[0][2], other[2])
        assert rel(outs[0][0], other[0]) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_slot_gemvs_equal_row_block_gemms(dtype):
    """The decode slot GEMVs give the row-block GEMMs' function on the same MXFP4 bytes, also where slots
    share experts (T = 3), with a ragged last K step (I = 96 over 64-wide steps), bitwise repeatably."""
    from dataclasses import replace

    from gptoss_verify.kernels import moe as kmoe
    h, rw, rb, gu, gub, dn, dnb = (x.to(dtype) for x in make_layer(3, 64, 96, 8, seed=14))
    gb, gs = mxfp4.from_hf_dense(gu.float().cpu())
    db, ds = mxfp4.from_hf_dense(dn.float().cpu())
    gb, gs, db, ds = (x.to(DEVICE) for x in (gb, gs, db, ds))
    gemv = replace(kmoe.choose_config(3, 8, 4, mxfp4=True), gemv=True, gemv_k1=64, gemv_k2=64)
    args = (h, rw, rb, gb, gs, gub, db, ds, dnb, 4, ALPHA, LIMIT, 96, True)
    a, again = kmoe._forward(*args, gemv), kmoe._forward(*args, gemv)
    b = kmoe._forward(*args, replace(gemv, gemv=False, dot_scaled=False))
    assert torch.equal(a[2], b[2])
    assert rel(a[0], b[0]) < (1e-6 if dtype == torch.float32 else 2e-3)
    for x, y in zip(a, again):
        assert torch.equal(x, y)


def test_slot_gemv_decodes_every_byte_at_every_scale():
    """With one-hot activations each GEMV output is one weight: every byte value (two codes) at every
    E8M0 scale byte 0..254 equals the codec's decode exactly (the extremes overflow or go subnormal
    as the codec rounds them). Scale 255 is 2^128 to the codec: an infinite weight, which a dot
    product can only carry as a non-finite output (0 · inf is NaN)."""
    from gptoss_verify.kernels import _moe_gemv
    scales_used, k = torch.arange(256, dtype=torch.uint8), 64
    n = 8 * scales_used.numel()  # 8 rows per scale byte x 32 bytes per row: all 256 byte values at each
    blocks = torch.arange(256, dtype=torch.uint8).repeat(scales_used.numel()).reshape(1, n, k // 32, 16)
    scales = scales_used.repeat_interleave(8).reshape(1, n, 1).expand(1, n, k // 32).contiguous()
    want = mxfp4.decode(blocks, scales, torch.float32)[0]  # [n, k]
    eye = torch.eye(k, device=DEVICE)
    idx = torch.zeros(k, dtype=torch.int64, device=DEVICE)
    ones = torch.ones(k, device=DEVICE)
    bias = torch.zeros(1, n, device=DEVICE)
    words, scales = blocks.to(DEVICE).view(torch.int32), scales.to(DEVICE)
    y = torch.empty(k, n, device=DEVICE)
    block_n = 256
    _moe_gemv.gemv_down_kernel[(k, n // block_n)](
        eye, words, scales, bias, idx, ones, y, n, k, eye.stride(0), words.stride(0) // 4, words.stride(1) // 4,
        scales.stride(0), scales.stride(1), bias.stride(0), y.stride(0), BLOCK_N=block_n, BLOCK_K=64,
        PTX=DEVICE == "cuda")
    got, finite = y.T.cpu(), scales[0, :, 0].cpu() < 255
    assert torch.equal(got[finite], want[finite]), (got[finite] != want[finite]).nonzero()[:5]
    assert not got[~finite].isfinite().any()


def test_tiny_model_with_fused_moe_matches_reference():
    """The model's MoE call site (argument order, keywords, reshapes) works with fused_moe: the tiny
    preset in float32 with the fused MoE (reference attention) gives the reference logits."""
    from gptoss_verify.config import preset
    from gptoss_verify.model import REFERENCE, Transformer
    from gptoss_verify.weights import random_weights

    spec = preset("tiny")
    state = random_weights(spec, seed=0, dtype=torch.float32, device=DEVICE)
    ids = torch.randint(0, spec.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        want = Transformer.from_state_dict(spec, state)(ids)
        got = Transformer.from_state_dict(spec, state, REFERENCE.replace(moe=fused_moe))(ids)
    assert rel(got, want) < 1e-4


def test_no_tokens():
    h, rw, rb, gu, gub, dn, dnb = make_layer(1, 64, 96, 8, seed=0)
    got = fused_moe(h[:0], rw, rb, gu, gub, dn, dnb, k=4, alpha=ALPHA, limit=LIMIT)
    want = moe(h[:0], rw, rb, gu, gub, dn, dnb, k=4, alpha=ALPHA, limit=LIMIT)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("fmt", ["dense", "mxfp4"])
def test_split_k_matches_unsplit(fmt):
    """Split-K GEMMs (decode tiles whose K is summed by several programs, partials reduced in a fixed
    order) give the same function as the unsplit kernels, pass the truth rule, and are deterministic."""
    from dataclasses import replace

    from gptoss_verify.kernels import moe as kmoe
    layer = make_layer(5, 64, 160, 8, seed=13)  # K = 64 and 160: several BLOCK_K steps, one ragged
    h, rw, rb, gu, gub, dn, dnb = layer
    base = replace(kmoe.choose_config(5, 8, 4), block_k=32)
    if fmt == "mxfp4":
        gb, gs = mxfp4.from_hf_dense(gu.cpu())
        db, ds = mxfp4.from_hf_dense(dn.cpu())
        mx = tuple(x.to(DEVICE) for x in (gb, gs, db, ds))
        args = (h, rw, rb, mx[0], mx[1], gub, mx[2], mx[3], dnb, 4, ALPHA, LIMIT, 160, True)
    else:
        mx = None
        args = (h, rw, rb, gu, None, gub, dn, None, dnb, 4, ALPHA, LIMIT, 160, False)
    assert kmoe._splits(160, 32, 3) == (3, 2) and kmoe._splits(64, 32, 4) == (2, 1)
    unsplit = kmoe._forward(*args, replace(base, split_k=1))
    split = kmoe._forward(*args, replace(base, split_k=3))
    again = kmoe._forward(*args, replace(base, split_k=3))
    assert torch.equal(unsplit[2], split[2])
    assert rel(split[0], unsplit[0]) < 1e-5
    for a, b in zip(split, again):
        assert torch.equal(a, b)
    _, ref, truth = run_all(layer, torch.float32, mx)
    check_truth_rule(split, ref, truth, f"split-K {fmt}")
