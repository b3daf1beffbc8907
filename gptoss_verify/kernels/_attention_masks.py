"""Which keys a block of queries sees (docs/numerics.md §2: key j is visible from query i iff
q_pos − W < k_pos ≤ q_pos, with q_pos = q_start + i and k_pos = k_start + j), as Triton helpers
shared by the forward, decode and backward kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _query_block(HQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """(b, h, kv head, first query row) of a program on grid (B·Hq, query blocks), the last query
    block (the one with the most keys) issued first."""
    bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    h = bh % HQ
    return bh // HQ, h, h // GROUP, pid_m * BLOCK_M


@triton.jit
def _packed_query(bkv, rows, n_q, HKV: tl.constexpr, GROUP: tl.constexpr):
    """A kv head's query group packed in one tile (decode): bkv is b·Hkv + kv head, and tile row r
    (a scalar or a vector of rows) is query r % n_q of head kvh·GROUP + r // n_q. Returns (b, i, h)."""
    return bkv // HKV, rows % n_q, (bkv % HKV) * GROUP + rows // n_q


@triton.jit
def _group_rows(n_q, HKV: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The whole packed tile of the decode program on grid (splits, B·Hkv): program_id(1) is
    b·Hkv + kv head (`_packed_query`). Returns (bkv, b, rows, row_ok, i, h)."""
    bkv = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    b, i, h = _packed_query(bkv, rows, n_q, HKV, GROUP)
    return bkv, b, rows, rows < GROUP * n_q, i, h


@triton.jit
def _key_range(first_q, last_q, n_k, k_start, window, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr):
    """[lo, hi): the keys some query in [first_q, last_q] sees; lo rounded down to a key block."""
    hi = tl.minimum(last_q - k_start + 1, n_k)
    lo = 0
    if SLIDING:
        lo = tl.maximum(first_q - window + 1 - k_start, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _unmasked_key_range(first_q, last_q, n_k, k_start, window, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr):
    """[lo, hi), both multiples of BLOCK_N: the key blocks that *every* query in [first_q, last_q]
    sees whole, so they need no mask (empty when lo ≥ hi)."""
    hi = tl.maximum(tl.minimum(first_q - k_start + 1, n_k), 0)
    hi = (hi // BLOCK_N) * BLOCK_N
    lo = 0
    if SLIDING:
        lo = tl.maximum(last_q - window + 1 - k_start, 0)
        lo = ((lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _three_ranges(lo, hi, full_lo, full_hi):
    """lo ≤ a ≤ b ≤ end: [lo, a) and [b, end) need the mask, [a, b) is the whole-block part of
    [lo, hi) that also lies in [full_lo, full_hi) (empty when those do not overlap)."""
    end = tl.maximum(hi, lo)
    a = tl.minimum(tl.maximum(full_lo, lo), end)
    b = tl.minimum(tl.maximum(full_hi, a), end)
    return a, b, end


@triton.jit
def _split_key_range(first_q, last_q, n_k, k_start, window, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr):
    """(lo, a, b, hi): keys [lo, a) and [b, hi) need the mask, [a, b) are whole unmasked blocks."""
    lo, hi = _key_range(first_q, last_q, n_k, k_start, window, BLOCK_N, SLIDING)
    full_lo, full_hi = _unmasked_key_range(first_q, last_q, n_k, k_start, window, BLOCK_N, SLIDING)
    a, b, hi = _three_ranges(lo, hi, full_lo, full_hi)
    return lo, a, b, hi


@triton.jit
def _split_query_range(first_k, last_k, n_q, q_start, window, BLOCK_M: tl.constexpr, SLIDING: tl.constexpr):
    """(lo, a, b, hi) over query indices for keys at positions [first_k, last_k]: queries [lo, hi)
    see some of them (lo rounded down to a query block); [a, b) are whole query blocks that see all
    of them and lie below n_q, so they need no mask."""
    lo = tl.maximum(first_k - q_start, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = tl.maximum(last_k - q_start, 0)
    full_lo = ((full_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    hi = n_q
    full_hi = (n_q // BLOCK_M) * BLOCK_M
    if SLIDING:
        hi = tl.minimum(last_k + window - q_start, n_q)
        full_hi = tl.maximum(tl.minimum(first_k + window - q_start, full_hi), 0)
        full_hi = (full_hi // BLOCK_M) * BLOCK_M
    a, b, hi = _three_ranges(lo, hi, full_lo, full_hi)
    return lo, a, b, hi


@triton.jit
def _visible(q_pos, offs_n, n_k, k_start, window, SLIDING: tl.constexpr):
    """[M, N] mask: key j visible from query i iff q_pos − W < k_pos ≤ q_pos (and j < n_k)."""
    k_pos = k_start + offs_n
    visible = (k_pos[None, :] <= q_pos[:, None]) & (offs_n[None, :] < n_k)
    if SLIDING:
        visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
    return visible
