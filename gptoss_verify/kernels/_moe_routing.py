"""Routing kernels of the fused MoE: router GEMM + bias + top-k + softmax over the k, then the
grouping of token slots by expert, all on the device with no host synchronisation.

A *slot* is one (token, choice) pair, numbered token·k + j. The router GEMM runs split over tokens,
experts and H (partials summed in a fixed order, so a handful of tokens still uses the whole chip;
for at most 16 tokens a CUDA-core GEMV in a few wide chunks instead);
the top-k kernel counts slots per
expert with integer atomics and gives each slot its rank inside its expert. The align kernel then
pads every expert's group to a multiple of the GEMM row block, lays the groups out one after
another, and writes, for each row block of that padded layout, its expert and how many of its rows
are real. The GEMM grid is sized for the worst case (⌈T·k/BM⌉ + E blocks) so nothing is read back
to the host; blocks with no real rows return at once.

Which row of a group a slot lands in depends on the order of the atomics, but the values do not:
every output row of a GEMM tile is computed on its own, and the combine sums each token's k slots
in a fixed order, so the result is bitwise deterministic.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T", "h_per_split"])
def router_logits_kernel(h_ptr, w_ptr, partial_ptr, counts_ptr, T, H, E, h_per_split, stride_h, stride_w,
                         BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
                         ALL_E: tl.constexpr):
    """partial[s, t, e] = Σ_{h in split s} h[t, h]·W[e, h]: the router GEMM split over T, E and H so
    that a few tokens still spread over the whole chip (the splits are summed in order later).
    The first program also zeroes the per-expert slot counts that the top-k kernel, launched after
    this one, counts into (one launch fewer than a separate memset)."""
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
        every = tl.arange(0, ALL_E)
        tl.store(counts_ptr + every, tl.zeros([ALL_E], dtype=tl.int32), mask=every < E)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(2)
    row_ok = rows < T
    col_ok = cols < E
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    h_end = tl.minimum(H, (split + 1) * h_per_split)
    for h0 in range(split * h_per_split, h_end, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        hk_ok = hk < h_end
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + hk[None, :],
                    mask=row_ok[:, None] & hk_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_w + hk[:, None], mask=col_ok[None, :] & hk_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    out = partial_ptr + split.to(tl.int64) * T * E + rows[:, None].to(tl.int64) * E + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def router_gemv_kernel(h_ptr, w_ptr, partial_ptr, counts_ptr, T, H, E, stride_h, stride_w,
                       BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, ALL_E: tl.constexpr):
    """partial[s, t, e] = Σ_{h in chunk s} h[t, h]·W[e, h] for a handful of tokens, on the CUDA cores:
    each program loads its BLOCK_E × BLOCK_H weights in one go, so a chunk costs one memory latency,
    and the top-k kernel sums only ⌈H / BLOCK_H⌉ partials (the tiled GEMM split H 45 ways at T = 1,
    and the top-k kernel's 45 dependent loads took 6 µs). Products are exact in float32 and summed
    in a fixed tree order. The first program zeroes the slot counts, as in router_logits_kernel."""
    t, split = tl.program_id(0), tl.program_id(2)
    if (t == 0) & (tl.program_id(1) == 0) & (split == 0):
        every = tl.arange(0, ALL_E)
        tl.store(counts_ptr + every, tl.zeros([ALL_E], dtype=tl.int32), mask=every < E)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    hk = split * BLOCK_H + tl.arange(0, BLOCK_H)
    hk_ok = hk < H
    x = tl.load(h_ptr + t.to(tl.int64) * stride_h + hk, mask=hk_ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols[:, None] * stride_w + hk[None, :], mask=(cols < E)[:, None] & hk_ok[None, :],
                other=0.0).to(tl.float32)
    out = partial_ptr + split.to(tl.int64) * T * E + t.to(tl.int64) * E + cols
    tl.store(out, tl.sum(w * x[None, :], axis=1), mask=cols < E)


@triton.jit(do_not_specialize=["T", "SPLITS"])
def router_topk_kernel(partial_ptr, b_ptr, logits_ptr, idx_ptr, weights_ptr, weights32_ptr, counts_ptr, rank_ptr,
                       T, E, SPLITS,
                       TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TOPK: tl.constexpr,
                       COUNT: tl.constexpr):
    """Sum the router partials in order, add the bias, then top-k, softmax over the k, and (COUNT: for
    the align pass) count and rank the slots per expert."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    ptrs = partial_ptr + rows[:, None].to(tl.int64) * E + cols[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for _ in range(0, SPLITS):
        acc += tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        ptrs += T * E
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    logits = acc + bias[None, :]
    tl.store(logits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :],
             logits.to(logits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    # top-k by repeated arg-max on the float32 logits (lowest index wins a tie)
    vals = tl.where(col_ok[None, :], logits, float("-inf"))
    kcol = tl.arange(0, BLOCK_TOPK)
    sel_v = tl.full([BLOCK_T, BLOCK_TOPK], float("-inf"), dtype=tl.float32)
    sel_i = tl.zeros([BLOCK_T, BLOCK_TOPK], dtype=tl.int32)
    for j in tl.static_range(TOPK):
        best = tl.max(vals, axis=1)
        arg = tl.min(tl.where(vals == best[:, None], cols[None, :], BLOCK_E), axis=1)
        arg = tl.minimum(arg, E - 1)  # NaN rows: stay in bounds
        sel_v = tl.where(kcol[None, :] == j, best[:, None], sel_v)
        sel_i = tl.where(kcol[None, :] == j, arg[:, None], sel_i)
        vals = tl.where(cols[None, :] == arg[:, None], float("-inf"), vals)
    k_ok = kcol < TOPK
    p = tl.exp(sel_v - tl.max(sel_v, axis=1)[:, None])
    p = tl.where(k_ok[None, :], p, 0.0)
    p = p / tl.sum(p, axis=1)[:, None]

    slot = rows[:, None] * TOPK + kcol[None, :]
    slot_ok = row_ok[:, None] & k_ok[None, :]
    tl.store(idx_ptr + slot, sel_i.to(tl.int64), mask=slot_ok)
    tl.store(weights_ptr + slot, p.to(weights_ptr.dtype.element_ty), mask=slot_ok)
    tl.store(weights32_ptr + slot, p, mask=slot_ok)
    if COUNT:  # relaxed: the align kernel reads the counts after this launch ends, which orders them
        rank = tl.atomic_add(counts_ptr + sel_i, tl.full([BLOCK_T, BLOCK_TOPK], 1, tl.int32), mask=slot_ok,
                             sem="relaxed")
        tl.store(rank_ptr + slot, rank, mask=slot_ok)


@triton.jit(do_not_specialize=["TK", "NUM_BLOCKS"])
def align_kernel(idx_ptr, rank_ptr, counts_ptr, sorted_slot_ptr, block_expert_ptr, block_rows_ptr,
                 TK, E, NUM_BLOCKS,
                 BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    ecol = tl.arange(0, BLOCK_E)
    e_ok = ecol < E
    count = tl.load(counts_ptr + ecol, mask=e_ok, other=0)
    padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded

    s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < TK
    e = tl.load(idx_ptr + s, mask=s_ok, other=0).to(tl.int32)
    r = tl.load(rank_ptr + s, mask=s_ok, other=0)
    start_e = tl.sum(tl.where(e[:, None] == ecol[None, :], starts[None, :], 0), axis=1)
    tl.store(sorted_slot_ptr + start_e + r, s, mask=s_ok)

    if pid == 0:
        for b0 in range(0, NUM_BLOCKS, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            b_ok = b < NUM_BLOCKS
            row0 = b * BLOCK_M
            ex = tl.sum(tl.where((ends[None, :] <= row0[:, None]) & e_ok[None, :], 1, 0), axis=1)
            real_end = tl.sum(tl.where(ecol[None, :] == ex[:, None], starts[None, :] + count[None, :], 0), axis=1)
            nrows = tl.minimum(tl.maximum(real_end - row0, 0), BLOCK_M)
            nrows = tl.where(ex < E, nrows, 0)
            tl.store(block_expert_ptr + b, tl.minimum(ex, E - 1), mask=b_ok)
            tl.store(block_rows_ptr + b, nrows, mask=b_ok)
