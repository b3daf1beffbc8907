"""The fused MoE: `fused_moe` (dense bf16/fp16/fp32 experts) and `fused_moe_mxfp4` (checkpoint MXFP4
experts decoded in the GEMM inner loop), both with the reference `model.moe.moe` signature and return.

Forward, six Triton launches (eight with split-K; five with the slot GEMVs that serve at most 16 MXFP4
decode slots: router, top-k, two `_moe_gemv` GEMVs, combine), no host synchronisation (CUDA-graph capturable):
router GEMM (split over tokens, experts and H) -> top-k (bias, top-k, softmax over the k,
per-expert counts) -> align (group slots by expert) -> GEMM 1 (gate_up + bias + clamped SwiGLU) -> GEMM 2 (down + bias, × routing weight) ->
combine (deterministic sum of each token's k slots). Accumulation is float32 throughout; the
routing is chosen on the float32 logits (lowest expert index wins an exact tie) and the returned
logits are those rounded to the input dtype.

Backward, fused too (`_moe_backward`): under autograd the forward keeps its routing, the activation
and the gate/up pre-activation, and the backward runs the dact GEMM (a plain GEMM, float32 out), an
elementwise pass for the clamped-SwiGLU derivative and the routing-weight gradient, the weight
gradients per expert on rows gathered once into expert order, the bias gradients in two fixed-order
passes (row blocks, then experts), dX per slot, the router backward and a deterministic combine.
MXFP4 experts are frozen (gradients of h, the router and the biases).
"""
from __future__ import annotations

from dataclasses import dataclass

import os
import warnings

import torch
import triton

from . import _moe_backward, _moe_gemm, _moe_gemv, _moe_routing

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SCALED_FAILED: list[str] = []  # set once tl.dot_scaled fails to compile here


@dataclass(frozen=True)
class MoEConfig:
    """Tile shapes of the grouped GEMMs. block_m is shared by both GEMMs (it is the row padding)."""
    block_m: int = 64
    block_n1: int = 128  # GEMM 1 columns of gate_up (interleaved), so block_n1/2 activation columns
    block_n2: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    dot_scaled: bool = True  # MXFP4: Triton's tl.dot_scaled (True) or our decode_tile (False)
    split_k: int = 1  # >1: each GEMM tile's K is summed by this many programs (float32 partials, fixed order)
    gemv: bool = False  # MXFP4 inference: one CUDA-core GEMV per (slot, column tile) instead (_moe_gemv)
    gemv_n1: int = 64  # gate_up GEMV: weight rows per program
    gemv_k1: int = 256  # ... weight columns per step
    gemv_n2: int = 32  # down GEMV: weight rows per program
    gemv_k2: int = 512  # ... weight columns per step


def choose_config(tokens: int, experts: int, k: int, mxfp4: bool = False) -> MoEConfig:
    """A tile shape from the mean rows per expert: skinny tiles for decode, wide ones for prefill.
    MXFP4 decode takes narrower weight tiles (more programs stream the experts); with at most 16
    slots the slot GEMVs instead (split_k is then what an autograd forward, which keeps the row blocks,
    uses). The sweeps behind these: reports/gpu-2026-12-02-h200-moe/, reports/gpu-2026-12-04b-h200/ and
    reports/gpu-2026-12-04c-h200/."""
    if _interpreting():
        return MoEConfig(block_m=16, block_n1=64, block_n2=64, block_k=64, group_m=4, num_warps=4, num_stages=1,
                         gemv=mxfp4 and tokens * k <= 16, gemv_n1=16, gemv_k1=64, gemv_n2=16, gemv_k2=64)
    rows = tokens * k / experts
    if rows <= 16:
        if mxfp4:
            few = tokens * k <= 16  # the slot GEMVs (split-K row blocks for an autograd forward)
            down = dict(gemv_n2=32, gemv_k2=512) if tokens * k <= 8 else dict(gemv_n2=64, gemv_k2=256)
            return MoEConfig(16, 64, 64, 128, 8, 4, 4, split_k=4 if few else 1, gemv=few, **down)
        return MoEConfig(16, 128, 128, 128, 8, 4, 4)
    if rows <= 64:
        return MoEConfig(64, 128, 128, 64, 8, 4, 4)
    if mxfp4:  # 256-row blocks (half the decodes) were within run-to-run noise of these (sweep-3)
        return MoEConfig(128, 128, 128, 64, 8, 8, 3)
    return MoEConfig(128, 256, 128, 64, 8, 8, 3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fail(name: str, expected: str, actual) -> None:
    raise ValueError(f"fused_moe: {name}: expected {expected}, got {actual}")


def _check_dense(h, rw, rb, gu, gub, dn, dnb, k):
    if h.dim() != 2:
        _fail("h", "[T, H]", list(h.shape))
    if h.dtype not in _DTYPES:
        _fail("h", f"one of {_DTYPES}", h.dtype)
    t, hid = h.shape
    e = rw.shape[0]
    if list(rw.shape) != [e, hid]:
        _fail("router_weight", f"[E, {hid}]", list(rw.shape))
    if list(rb.shape) != [e]:
        _fail("router_bias", f"[{e}]", list(rb.shape))
    if not 1 <= k <= e:
        _fail("k", f"1 <= k <= E = {e}", k)
    if gu is not None:
        if gu.dim() != 3 or gu.shape[0] != e or gu.shape[1] != hid or gu.shape[2] % 2:
            _fail("gate_up", f"[{e}, {hid}, 2I]", list(gu.shape))
        inter = gu.shape[2] // 2
        if list(dn.shape) != [e, inter, hid]:
            _fail("down", f"[{e}, {inter}, {hid}]", list(dn.shape))
    for name, x in (("router_weight", rw), ("router_bias", rb), ("gate_up", gu), ("down", dn),
                    ("gate_up_bias", gub), ("down_bias", dnb)):
        if x is not None and x.device != h.device:
            _fail(name, f"device {h.device}", x.device)
        if x is not None and x.dtype != h.dtype:
            _fail(name, f"dtype {h.dtype} (as h)", x.dtype)
    if h.device.type != "cuda" and not _interpreting():
        _fail("h", "a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)", h.device)
    return t, hid, e


def _forward(h, rw, rb, gu_w, gu_s, gub, dn_w, dn_s, dnb, k, alpha, limit, inter, mxfp4, config=None, save=None):
    """The launch sequence shared by the dense and MXFP4 paths (weights already checked). With `save`
    (a dict), the routing, the activation and the gate/up pre-activation are kept in it for `_backward`."""
    t, hid = h.shape
    e = rw.shape[0]
    dev, dtype = h.device, h.dtype
    if t == 0:  # nothing to launch (a zero grid is not a valid launch)
        return (h.new_empty(0, hid), h.new_empty(0, e), torch.empty(0, k, dtype=torch.int64, device=dev),
                h.new_empty(0, k))
    cfg = config or choose_config(t, e, k, mxfp4)
    ieee = dtype == torch.float32
    scaled = mxfp4 and cfg.dot_scaled and not ieee  # tl.dot_scaled takes bf16/fp16 activations only
    lhs_format = "fp16" if dtype == torch.float16 else "bf16"
    h = h.contiguous()
    rw, rb, gub, dnb = rw.contiguous(), rb.contiguous(), gub.contiguous(), dnb.contiguous()
    tk = t * k

    logits = torch.empty(t, e, device=dev, dtype=dtype)
    idx = torch.empty(t, k, device=dev, dtype=torch.int64)
    weights = torch.empty(t, k, device=dev, dtype=dtype)
    weights32 = torch.empty(tk, device=dev, dtype=torch.float32)
    counts = torch.empty(e, device=dev, dtype=torch.int32)  # zeroed by the router kernel
    rank = torch.empty(tk, device=dev, dtype=torch.int32)
    block_e = max(16, triton.next_power_of_2(e))
    if t <= 16:  # a handful of tokens: the router as GEMVs in 1024-wide chunks of H
        splits = triton.cdiv(hid, 1024)
        partial = torch.empty(splits, t, e, device=dev, dtype=torch.float32)
        _moe_routing.router_gemv_kernel[(t, triton.cdiv(e, 4), splits)](
            h, rw, partial, counts, t, hid, e, h.stride(0), rw.stride(0), BLOCK_E=4, BLOCK_H=1024, ALL_E=block_e,
            num_warps=4)
    else:
        # router GEMM: tiles of tokens x experts, split over H until ~256 programs are busy (a prefill with
        # one program per 32 x 32 tile walked all of H serially: 47 us at T = 4096 on the H200)
        rt_t = 16 if t <= 256 else 64
        rt_e = 16 if t <= 256 else min(block_e, 64)
        tiles = triton.cdiv(t, rt_t) * triton.cdiv(e, rt_e)
        chunks = triton.cdiv(hid, 64)
        splits = max(1, min(chunks, 256 // tiles))
        per_split = triton.cdiv(chunks, splits) * 64
        splits = triton.cdiv(hid, per_split)
        partial = torch.empty(splits, t, e, device=dev, dtype=torch.float32)
        _moe_routing.router_logits_kernel[(triton.cdiv(t, rt_t), triton.cdiv(e, rt_e), splits)](
            h, rw, partial, counts, t, hid, e, per_split, h.stride(0), rw.stride(0),
            BLOCK_T=rt_t, BLOCK_E=rt_e, BLOCK_H=64, IEEE=ieee, ALL_E=block_e, num_warps=4)
    block_t = 16
    slot_gemvs = mxfp4 and cfg.gemv and save is None
    _moe_routing.router_topk_kernel[(triton.cdiv(t, block_t),)](
        partial, rb, logits, idx, weights, weights32, counts, rank, t, e, splits,
        TOPK=k, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_TOPK=triton.next_power_of_2(k), COUNT=not slot_gemvs,
        num_warps=4)

    if slot_gemvs:  # a handful of decode slots: GEMVs per slot, no align pass
        y = _slot_gemvs(h, gu_w, gu_s, gub, dn_w, dn_s, dnb, idx, weights32, k, alpha, limit, inter, cfg)
        return _combine(y, y, idx, weights32, dnb, 1, 0, t, k), logits, idx, weights

    bm = cfg.block_m
    num_m = triton.cdiv(tk, bm) + min(e, tk)
    sorted_slot = torch.empty(num_m * bm, device=dev, dtype=torch.int32)
    block_expert = torch.empty(num_m, device=dev, dtype=torch.int32)
    block_rows = torch.empty(num_m, device=dev, dtype=torch.int32)
    block_s = max(16, 16384 // block_e)  # [block_s, block_e] compares per program: keep them in registers
    _moe_routing.align_kernel[(triton.cdiv(tk, block_s),)](
        idx, rank, counts, sorted_slot, block_expert, block_rows, tk, e, num_m,
        BLOCK_M=bm, BLOCK_E=block_e, BLOCK_S=block_s, BLOCK_B=64, num_warps=4)

    act = torch.empty(num_m * bm, inter, device=dev, dtype=dtype)
    n1 = 2 * inter
    pre = torch.empty(num_m * bm, n1, device=dev, dtype=dtype) if save is not None else act
    if mxfp4:
        w1 = (gu_w.stride(0), 0, gu_w.stride(1), gu_s.stride(0), gu_s.stride(1))
        w2 = (dn_w.stride(0), 0, dn_w.stride(1), dn_s.stride(0), dn_s.stride(1))
        s1, s2 = gu_s, dn_s
    else:
        w1 = (gu_w.stride(0), gu_w.stride(1), gu_w.stride(2), 0, 0)
        w2 = (dn_w.stride(0), dn_w.stride(1), dn_w.stride(2), 0, 0)
        s1, s2 = gu_w, dn_w  # unused placeholders
    y = torch.empty(tk, hid, device=dev, dtype=dtype)  # weighted slot outputs, rounded once

    # split-K: slices of K in whole BLOCK_K steps; partials in slot order, float32
    split1, per1 = _splits(hid, cfg.block_k, cfg.split_k)
    split2, per2 = _splits(inter, cfg.block_k, cfg.split_k)
    part1 = torch.empty(split1, tk, n1, device=dev, dtype=torch.float32) if split1 > 1 else y
    part2 = torch.empty(split2, tk, hid, device=dev, dtype=torch.float32) if split2 > 1 else y
    ps1 = part1.stride(0) if split1 > 1 else 0
    ps2 = part2.stride(0) if split2 > 1 else 0

    def gemms(scaled):
        _moe_gemm.gate_up_kernel[(num_m * triton.cdiv(n1, cfg.block_n1), split1)](
            h, gu_w, s1, gub, act, pre, part1, sorted_slot, block_expert, block_rows, n1, hid, num_m, per1, h.stride(0),
            *w1, gub.stride(0), act.stride(0), ps1, float(alpha), float(limit),
            TOPK=k, MXFP4=mxfp4, BLOCK_M=bm, BLOCK_N=cfg.block_n1, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            EVEN_K=hid % cfg.block_k == 0, IEEE=ieee, SCALED=scaled, LHS_FORMAT=lhs_format, SPLIT_K=split1,
            SAVE_PRE=save is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if split1 > 1:
            _moe_gemm.swiglu_kernel[(num_m, triton.cdiv(n1, 128))](
                part1, gub, act, pre, sorted_slot, block_expert, block_rows, n1, split1, ps1, gub.stride(0),
                act.stride(0), float(alpha), float(limit), BLOCK_M=bm, BLOCK_N=128, SAVE_PRE=save is not None,
                num_warps=4)

        _moe_gemm.down_kernel[(num_m * triton.cdiv(hid, cfg.block_n2), split2)](
            act, dn_w, s2, dnb, weights32, y, part2, sorted_slot, block_expert, block_rows, hid, inter, num_m, per2,
            act.stride(0), *w2, dnb.stride(0), y.stride(0), ps2,
            MXFP4=mxfp4, BLOCK_M=bm, BLOCK_N=cfg.block_n2, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            EVEN_K=inter % cfg.block_k == 0, IEEE=ieee, SCALED=scaled, LHS_FORMAT=lhs_format, SPLIT_K=split2,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if scaled and _SCALED_FAILED:
        scaled = False
    try:
        gemms(scaled)
    except Exception as exc:  # a Triton without tl.dot_scaled on this GPU: use our own decode
        if not scaled:
            raise
        _SCALED_FAILED.append(repr(exc))
        warnings.warn(f"fused_moe_mxfp4: tl.dot_scaled failed ({exc!r}); using the in-kernel decode instead")
        gemms(False)

    out = _combine(y, part2, idx, weights32, dnb, split2, ps2, t, k)
    if save is not None:
        save.update(weights32=weights32, counts=counts, sorted_slot=sorted_slot, block_expert=block_expert,
                    block_rows=block_rows, act=act, pre=pre, idx=idx, num_m=num_m, block_m=bm)
    return out, logits, idx, weights


def _combine(y, part2, idx, weights32, dnb, splits, stride_ps, t, k):
    """Each token's k slot rows summed in order (after a split-K GEMM 2, from its partials)."""
    hid = y.shape[1]
    out = torch.empty(t, hid, device=y.device, dtype=y.dtype)
    block_n = 256 if hid >= 256 else triton.next_power_of_2(hid)
    _moe_gemm.combine_kernel[(t, triton.cdiv(hid, block_n))](
        y, out, part2, idx, weights32, dnb, hid, splits, y.stride(0), out.stride(0), stride_ps, dnb.stride(0),
        TOPK=k, BLOCK_N=block_n, SPLIT_K=splits, num_warps=4)
    return out


def _slot_gemvs(h, gu_w, gu_s, gub, dn_w, dn_s, dnb, idx, weights32, k, alpha, limit, inter, cfg):
    """The weighted slot outputs y [T·k, H] of MXFP4 experts by `_moe_gemv` (the blocks read as int32
    words of eight codes; their strides passed in 16-byte groups of four words)."""
    tk, hid = idx.numel(), h.shape[1]
    n1 = 2 * inter
    gu_words, dn_words = gu_w.view(torch.int32), dn_w.view(torch.int32)
    act = torch.empty(tk, inter, device=h.device, dtype=h.dtype)
    launch = dict(PTX=not _interpreting(), num_warps=cfg.num_warps)
    _moe_gemv.gemv_gate_up_kernel[(tk, triton.cdiv(n1, cfg.gemv_n1))](
        h, gu_words, gu_s, gub, idx, act, n1, hid, h.stride(0), gu_words.stride(0) // 4, gu_words.stride(1) // 4,
        gu_s.stride(0), gu_s.stride(1), gub.stride(0), act.stride(0), float(alpha), float(limit), TOPK=k,
        BLOCK_N=cfg.gemv_n1, BLOCK_K=cfg.gemv_k1, **launch)
    y = torch.empty(tk, hid, device=h.device, dtype=h.dtype)
    _moe_gemv.gemv_down_kernel[(tk, triton.cdiv(hid, cfg.gemv_n2))](
        act, dn_words, dn_s, dnb, idx, weights32, y, hid, inter, act.stride(0), dn_words.stride(0) // 4,
        dn_words.stride(1) // 4, dn_s.stride(0), dn_s.stride(1), dnb.stride(0), y.stride(0),
        BLOCK_N=cfg.gemv_n2, BLOCK_K=cfg.gemv_k2, **launch)
    return y


def _splits(k_dim: int, block_k: int, wanted: int) -> tuple[int, int]:
    """(programs per tile, BLOCK_K steps per program): `wanted` slices of K in whole steps, none empty."""
    steps = triton.cdiv(k_dim, block_k)
    per = triton.cdiv(steps, max(1, min(wanted, steps)))
    return triton.cdiv(steps, per), per


@dataclass(frozen=True)
class BackwardConfig:
    """Tile shapes of the backward. The row-block kernels (dact, dx_slot) use the forward's block_m;
    their 128 x 128 x 64 tiles, 8 warps and 3 stages are the forward GEMM 2's prefill configuration."""
    block_n: int = 128       # dact columns (of I) and dx_slot columns (of H)
    block_k: int = 64
    grad_m: int = 128        # expert_grad_kernel: [grad_m, grad_n] tiles of a weight gradient,
    grad_n: int = 128        # K = the expert's rows, grad_k at a time
    grad_k: int = 64
    num_warps: int = 8       # dact and dx_slot
    num_stages: int = 3
    grad_warps: int = 8      # expert_grad_kernel
    grad_stages: int = 3
    swiglu_rows: int = 16    # swiglu_bwd_kernel: rows per program (at most block_m), walking I
    swiglu_n: int = 128      # in chunks of this many activation columns (2x as many pre-activation ones)
    bias_n: int = 256        # gather_rows / block_sums / expert_sums: columns per program


def choose_backward_config() -> BackwardConfig:
    if _interpreting():  # small tiles: several K steps and column tiles even at the tests' shapes
        return BackwardConfig(block_n=64, block_k=32, grad_m=32, grad_n=64, grad_k=16, num_warps=4, num_stages=1,
                              grad_warps=4, grad_stages=1, swiglu_rows=16, swiglu_n=64, bias_n=64)
    return BackwardConfig()


_DENSE_ARGS = ("h", "router_weight", "router_bias", "gate_up", "gate_up_bias", "down", "down_bias")


def _backward(sv, h, rw, gu_w, gu_s, dn_w, dn_s, dnb, idx, d_out, d_logits, d_weights, need, k, alpha, limit,
              inter, mxfp4, config=None):
    """Gradients {name: tensor} of the inputs in `need` (names of `_DENSE_ARGS`), from the forward's
    saved state `sv`; see `_moe_backward` for the kernels and the formulas."""
    t, hid = h.shape
    e = rw.shape[0]
    dev, dtype = h.device, h.dtype
    wanted = [n for n in _DENSE_ARGS if need.get(n)]
    shapes = {"h": (t, hid), "router_weight": (e, hid), "router_bias": (e,), "gate_up": (e, hid, 2 * inter),
              "gate_up_bias": (e, 2 * inter), "down": (e, inter, hid), "down_bias": (e, hid)}
    if t == 0 or d_out is None and any(n in wanted for n in ("gate_up", "gate_up_bias", "down", "down_bias")):
        grads = {n: torch.zeros(shapes[n], device=dev, dtype=dtype) for n in wanted}
        if t == 0:
            return grads
    else:
        grads = {}
    cfg = config or choose_backward_config()
    ieee = dtype == torch.float32
    tk, bm, num_m = t * k, sv["block_m"], sv["num_m"]
    block_e = max(16, triton.next_power_of_2(e))
    w32, counts, sorted_slot = sv["weights32"], sv["counts"], sv["sorted_slot"]
    blocks = (sorted_slot, sv["block_expert"], sv["block_rows"])
    h = h.contiguous()
    if mxfp4:
        wd = (dn_w.stride(0), dn_w.stride(1), 1, dn_s.stride(0), dn_s.stride(1))
        wg = (gu_w.stride(0), gu_w.stride(1), 1, gu_s.stride(0), gu_s.stride(1))
        sd, sg = dn_s, gu_s
    else:
        wd = (dn_w.stride(0), dn_w.stride(2), dn_w.stride(1), 0, 0)
        wg = (gu_w.stride(0), gu_w.stride(2), gu_w.stride(1), 0, 0)
        sd, sg = dn_w, gu_w  # unused placeholders
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    dpre = dwa = None
    if d_out is not None:
        d_out = d_out.contiguous()
        rows = num_m * bm
        da = torch.empty(rows, inter, device=dev, dtype=torch.float32)
        _moe_backward.dact_kernel[(num_m * triton.cdiv(inter, cfg.block_n),)](
            d_out, dn_w, sd, da, *blocks, inter, hid, num_m, d_out.stride(0), *wd, TOPK=k, MXFP4=mxfp4, BLOCK_M=bm,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8, EVEN_K=hid % cfg.block_k == 0, IEEE=ieee, **launch)
        dpre = torch.empty(rows, 2 * inter, device=dev, dtype=dtype)
        dwa = torch.empty(tk, device=dev, dtype=torch.float32)
        block_r = min(cfg.swiglu_rows, bm)  # bm and swiglu_rows are powers of two: block_r divides bm
        _moe_backward.swiglu_bwd_kernel[(rows // block_r,)](
            da, sv["act"], sv["pre"], w32, dpre, dwa, sorted_slot, sv["block_rows"], inter, float(alpha),
            float(limit), ROW_BLOCK=bm, BLOCK_R=block_r, BLOCK_N=cfg.swiglu_n, num_warps=4)
        del da
        ys = None
        gather = dict(ROW_BLOCK=bm, BLOCK_R=min(32, bm), BLOCK_N=cfg.bias_n, num_warps=4)
        if need.get("down") or need.get("down_bias"):  # w·dO in sorted rows: both down gradients read it
            ys = torch.empty(rows, hid, device=dev, dtype=dtype)
            _moe_backward.gather_rows_kernel[(num_m, triton.cdiv(hid, cfg.bias_n))](
                d_out, w32, ys, sorted_slot, sv["block_rows"], hid, d_out.stride(0), SCALED=True, TOPK=k, **gather)
        for name, m, n in (("down", inter, hid), ("gate_up", hid, 2 * inter)):
            if not need.get(name):
                continue
            if name == "down":
                x, y = sv["act"], ys
            else:  # h in sorted rows
                x, y = torch.empty(rows, hid, device=dev, dtype=dtype), dpre
                _moe_backward.gather_rows_kernel[(num_m, triton.cdiv(hid, cfg.bias_n))](
                    h, w32, x, sorted_slot, sv["block_rows"], hid, h.stride(0), SCALED=False, TOPK=k, **gather)
            out = torch.empty(e, m, n, device=dev, dtype=dtype)
            tiles = triton.cdiv(m, cfg.grad_m) * triton.cdiv(n, cfg.grad_n)
            _moe_backward.expert_grad_kernel[(e * tiles,)](
                x, y, out, counts, m, n, e, x.stride(0), y.stride(0), ROW_BLOCK=bm, BLOCK_E=block_e,
                BLOCK_M=cfg.grad_m, BLOCK_N=cfg.grad_n, BLOCK_K=cfg.grad_k, IEEE=ieee, num_warps=cfg.grad_warps,
                num_stages=cfg.grad_stages)
            grads[name] = out
            del x
        for name, y, n in (("down_bias", ys, hid), ("gate_up_bias", dpre, 2 * inter)):
            if need.get(name):  # two passes: per row block, then per expert over its blocks in order
                part = torch.empty(num_m, n, device=dev, dtype=torch.float32)
                bn = cfg.bias_n
                _moe_backward.block_sums_kernel[(num_m, triton.cdiv(n, bn))](
                    y, part, sv["block_rows"], n, y.stride(0), ROW_BLOCK=bm, BLOCK_R=min(32, bm), BLOCK_N=bn,
                    num_warps=4)
                out = torch.empty(e, n, device=dev, dtype=dtype)
                _moe_backward.expert_sums_kernel[(e, triton.cdiv(n, bn))](
                    part, out, counts, n, e, ROW_BLOCK=bm, BLOCK_E=block_e, BLOCK_N=bn, num_warps=4)
                grads[name] = out

    if not any(need.get(n) for n in ("h", "router_weight", "router_bias")):
        return grads
    dl = torch.empty(t, e, device=dev, dtype=torch.float32)
    d_weights = None if d_weights is None else d_weights.contiguous()
    d_logits = None if d_logits is None else d_logits.contiguous()
    _moe_backward.router_grad_kernel[(triton.cdiv(t, 16),)](
        dwa if dwa is not None else dl, d_out if d_out is not None else h, dnb, idx, w32,
        d_weights if d_weights is not None else dl, d_logits if d_logits is not None else dl, dl, t, e, hid,
        d_out.stride(0) if d_out is not None else 0, dnb.stride(0), HAS_DOUT=d_out is not None,
        HAS_DW=d_weights is not None, HAS_DL=d_logits is not None, TOPK=k, BLOCK_T=16, BLOCK_E=block_e,
        BLOCK_TOPK=triton.next_power_of_2(k), BLOCK_H=64, num_warps=4)
    if need.get("h"):
        dxs = dl
        if dpre is not None:
            dxs = torch.empty(tk, hid, device=dev, dtype=torch.float32)
            _moe_backward.dx_slot_kernel[(num_m * triton.cdiv(hid, cfg.block_n),)](
                dpre, gu_w, sg, dxs, *blocks, hid, 2 * inter, num_m, *wg, MXFP4=mxfp4, BLOCK_M=bm,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8, IEEE=ieee, **launch)
        dx = torch.empty(t, hid, device=dev, dtype=dtype)
        _moe_backward.dx_combine_kernel[(triton.cdiv(t, 16), triton.cdiv(hid, 64))](
            dxs, dl, rw, dx, t, e, hid, rw.stride(0), dx.stride(0), HAS_EXPERT=dpre is not None, TOPK=k,
            BLOCK_T=16, BLOCK_E=block_e, BLOCK_N=64, num_warps=4)
        grads["h"] = dx
    if need.get("router_weight") or need.get("router_bias"):
        tiles = triton.cdiv(hid, 64)
        chunks = triton.cdiv(t, 64)
        splits = max(1, min(chunks, 512 // tiles))
        per_split = triton.cdiv(chunks, splits) * 64
        splits = triton.cdiv(t, per_split)
        part = torch.empty(splits, e, hid, device=dev, dtype=torch.float32)
        partb = torch.empty(splits, e, device=dev, dtype=torch.float32)
        _moe_backward.router_wgrad_kernel[(tiles, splits)](
            dl, h, part, partb, t, e, hid, per_split, h.stride(0), BLOCK_E=block_e, BLOCK_N=64, BLOCK_T=64,
            num_warps=4)
        drw = torch.empty(e, hid, device=dev, dtype=dtype)
        drb = torch.empty(e, device=dev, dtype=dtype)
        _moe_backward.router_wgrad_reduce_kernel[(triton.cdiv(e * hid, 1024),)](
            part, partb, drw, drb, splits, e, hid, BLOCK=1024, num_warps=4)
        grads.update(router_weight=drw, router_bias=drb)
    return grads


class _FusedMoE(torch.autograd.Function):
    """Fused forward (keeping its routing, activation and pre-activation), fused backward."""

    @staticmethod
    def forward(ctx, h, rw, rb, gu, gub, dn, dnb, k, alpha, limit):
        ctx.sv = {}
        out = _forward(h, rw, rb, gu, None, gub, dn, None, dnb, k, alpha, limit, gu.shape[2] // 2, False, save=ctx.sv)
        ctx.save_for_backward(h, rw, gu, dn, dnb, out[2])
        ctx.args = (k, alpha, limit)
        ctx.mark_non_differentiable(out[2])
        return out

    @staticmethod
    def backward(ctx, d_out, d_logits, d_idx, d_weights):
        h, rw, gu, dn, dnb, idx = ctx.saved_tensors
        need = dict(zip(_DENSE_ARGS, ctx.needs_input_grad[:7]))
        g = _backward(ctx.sv, h, rw, gu, None, dn, None, dnb, idx, d_out, d_logits, d_weights, need, *ctx.args,
                      gu.shape[2] // 2, False)
        return tuple(g.get(n) for n in _DENSE_ARGS) + (None, None, None)


def fused_moe(h: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, gate_up: torch.Tensor,
              gate_up_bias: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor, *, k: int,
              alpha: float, limit: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [T, H] -> (output [T, H], router logits [T, E], top-k indices [T, k], top-k weights [T, k]),
    with dense experts gate_up [E, H, 2I] (interleaved gate/up columns) and down [E, I, H]."""
    _check_dense(h, router_weight, router_bias, gate_up, gate_up_bias, down, down_bias, k)
    e, inter = gate_up.shape[0], gate_up.shape[2] // 2
    if list(gate_up_bias.shape) != [e, 2 * inter]:
        _fail("gate_up_bias", f"[{e}, {2 * inter}]", list(gate_up_bias.shape))
    if list(down_bias.shape) != [e, h.shape[1]]:
        _fail("down_bias", f"[{e}, {h.shape[1]}]", list(down_bias.shape))
    args = (h, router_weight, router_bias, gate_up, gate_up_bias, down, down_bias)
    if torch.is_grad_enabled() and any(x.requires_grad for x in args):
        return _FusedMoE.apply(*args, k, alpha, limit)
    return _forward(h, router_weight, router_bias, gate_up, None, gate_up_bias, down, None, down_bias,
                    k, alpha, limit, inter, False)


class _FusedMoEMXFP4(torch.autograd.Function):
    """Fused forward and backward with frozen MXFP4 experts: gradients of h, the router and the biases."""

    @staticmethod
    def forward(ctx, h, rw, rb, gub, dnb, gu_b, gu_s, dn_b, dn_s, k, alpha, limit):
        ctx.sv = {}
        out = _forward(h, rw, rb, gu_b, gu_s, gub, dn_b, dn_s, dnb, k, alpha, limit, gu_b.shape[1] // 2, True,
                       save=ctx.sv)
        ctx.save_for_backward(h, rw, dnb, gu_b, gu_s, dn_b, dn_s, out[2])
        ctx.args = (k, alpha, limit)
        ctx.mark_non_differentiable(out[2])
        return out

    @staticmethod
    def backward(ctx, d_out, d_logits, d_idx, d_weights):
        h, rw, dnb, gu_b, gu_s, dn_b, dn_s, idx = ctx.saved_tensors
        need = dict(zip(("h", "router_weight", "router_bias", "gate_up_bias", "down_bias"), ctx.needs_input_grad[:5]))
        g = _backward(ctx.sv, h, rw, gu_b, gu_s, dn_b, dn_s, dnb, idx, d_out, d_logits, d_weights, need, *ctx.args,
                      gu_b.shape[1] // 2, True)
        return (g.get("h"), g.get("router_weight"), g.get("router_bias"), g.get("gate_up_bias"),
                g.get("down_bias")) + (None,) * 7


def _check_mxfp4(name, blocks, scales, e, out, inner):
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        _fail(f"{name}_blocks/scales", "uint8", (blocks.dtype, scales.dtype))
    if inner % 32:
        _fail(name, "an input dimension divisible by 32", inner)
    if list(blocks.shape) != [e, out, inner // 32, 16]:
        _fail(f"{name}_blocks", f"[{e}, {out}, {inner // 32}, 16]", list(blocks.shape))
    if list(scales.shape) != [e, out, inner // 32]:
        _fail(f"{name}_scales", f"[{e}, {out}, {inner // 32}]", list(scales.shape))
    if blocks.stride(3) != 1 or blocks.stride(2) != 16 or scales.stride(2) != 1:
        _fail(f"{name}_blocks/scales", "contiguous last dimensions", (blocks.stride(), scales.stride()))


def fused_moe_mxfp4(h: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor,
                    gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_bias: torch.Tensor,
                    down_blocks: torch.Tensor, down_scales: torch.Tensor, down_bias: torch.Tensor, *, k: int,
                    alpha: float, limit: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `fused_moe`, with the experts in the checkpoint's MXFP4 layout: gate_up blocks
    [E, 2I, H/32, 16] and scales [E, 2I, H/32], down blocks [E, H, I/32, 16] and scales [E, H, I/32]
    (uint8; `formats.mxfp4`); equal to `fused_moe` on `formats.mxfp4.to_hf_dense` of them."""
    _check_dense(h, router_weight, router_bias, None, gate_up_bias, None, down_bias, k)
    t, hid = h.shape
    e = router_weight.shape[0]
    if gate_up_blocks.dim() != 4 or gate_up_blocks.shape[1] % 2:
        _fail("gate_up_blocks", f"[{e}, 2I, {hid // 32}, 16]", list(gate_up_blocks.shape))
    inter = gate_up_blocks.shape[1] // 2
    _check_mxfp4("gate_up", gate_up_blocks, gate_up_scales, e, 2 * inter, hid)
    _check_mxfp4("down", down_blocks, down_scales, e, hid, inter)
    for name, x in (("gate_up_blocks", gate_up_blocks), ("gate_up_scales", gate_up_scales),
                    ("down_blocks", down_blocks), ("down_scales", down_scales)):
        if x.device != h.device:
            _fail(name, f"device {h.device}", x.device)
    if list(gate_up_bias.shape) != [e, 2 * inter]:
        _fail("gate_up_bias", f"[{e}, {2 * inter}]", list(gate_up_bias.shape))
    if list(down_bias.shape) != [e, hid]:
        _fail("down_bias", f"[{e}, {hid}]", list(down_bias.shape))
    args = (h, router_weight, router_bias, gate_up_bias, down_bias)
    if torch.is_grad_enabled() and any(x.requires_grad for x in args):
        return _FusedMoEMXFP4.apply(*args, gate_up_blocks, gate_up_scales, down_blocks, down_scales, k, alpha, limit)
    return _forward(h, router_weight, router_bias, gate_up_blocks, gate_up_scales, gate_up_bias, down_blocks,
                    down_scales, down_bias, k, alpha, limit, inter, True)
