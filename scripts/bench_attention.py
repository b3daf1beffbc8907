"""Attention benchmark: our fused kernel next to its peers, in one run, one table.

Peers: FlashAttention-4 (CuTe DSL, SM90 path, learnable sinks, GQA native; where `flash_attn.cute`
imports: it travels to the device through `../shared/tools/prepare_fa4_carry.sh`, else its row says
why), FlexAttention with an LSE sink correction (out · σ(lse − sink)), SDPA flash without sinks
(a ceiling: it does less work and cannot express the window), and transformers-style eager
attention (matmul, mask, sink column, max subtraction, softmax, matmul). bf16, batch 1 unless
stated, 64 query / 8 kv heads, head_dim 64. FA4's rows also give ‖FA4 − ours‖ / ‖ours‖ of the
forward output (reported, not judged). Short forwards (decode, the short window: ~0.1 ms, where
launches weigh) are also timed replayed as CUDA graphs, ours and FA4 alike. Prints a markdown table; `--out PATH` also writes it, after
every case, so a cut-off run leaves the rows measured so far.
"""
from __future__ import annotations

import argparse
import datetime
import os
import torch
import torch.nn.functional as F
import triton
from tabulate import tabulate

from gptoss_verify.kernels.attention import fused_attention

HQ, HKV, D = 64, 8, 64
SHORT_FLOPS = 5e10  # below this a forward is ~0.1 ms, where launches weigh: decode, the short window


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + written), measured in this run: the
    decode ceiling."""
    src = torch.empty(1 << 30, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50)
    return 2 * (1 << 31) / (ms * 1e-3)


def eager(q, k, v, sinks, window, q_start=0, k_start=0):
    """transformers' eager GPT-OSS attention, written out: [B, S, H, D] in and out."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k = k.repeat_interleave(HQ // HKV, dim=1)
    v = v.repeat_interleave(HQ // HKV, dim=1)
    s = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
    qi = torch.arange(q.shape[2], device=q.device)[:, None] + q_start
    kj = torch.arange(k.shape[2], device=q.device)[None, :] + k_start
    visible = (kj <= qi) & ((kj > qi - window) if window else True)
    s = s + torch.where(visible, 0.0, torch.finfo(s.dtype).min).to(s.dtype)
    logits = torch.cat([s, sinks.view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    p = F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
    return torch.matmul(p, v).transpose(1, 2)


def make_flex(seq_q, seq_k, window, q_start):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)

    def mask_mod(b, h, qi, kj):
        ok = kj <= qi + q_start
        if window:
            ok = ok & (kj > qi + q_start - window)
        return ok

    block_mask = create_block_mask(mask_mod, None, None, seq_q, seq_k, device="cuda")

    def run(q, k, v, sinks):
        out, lse = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                            enable_gqa=True, return_lse=True)
        factor = torch.sigmoid(lse - sinks.float().view(1, -1, 1))  # Z / (Z + e^sink)
        return (out * factor.unsqueeze(-1).to(out.dtype)).transpose(1, 2)
    return run


def make_fa4(window):
    """FlashAttention-4's forward (and backward) with learnable sinks, or the reason it cannot run.
    Its causal mask aligns the last query with the last key, as our decode does (q_start = sk − 1)."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as err:  # noqa: BLE001 - an absent peer is a row saying why
        return f"absent: flash_attn.cute does not import ({type(err).__name__}: {err})"[:180]

    def run(q, k, v, sinks):
        out = flash_attn_func(q, k, v, causal=True, window_size=(window - 1, 0) if window else (None, None),
                              learnable_sink=sinks.float())
        return out[0] if isinstance(out, tuple) else out
    return run


def sdpa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)


def visible_pairs(sq, sk, window, q_start):
    """How many (query, key) pairs the mask lets through: the work a kernel that skips masked
    blocks must do."""
    qp = torch.arange(sq, dtype=torch.int64) + q_start
    hi = torch.clamp(qp, max=sk - 1)
    lo = torch.clamp(qp - window + 1, min=0) if window else torch.zeros_like(qp)
    return int(torch.clamp(hi - lo + 1, min=0).sum())


def bench(fn, backward: bool, inputs, graph: bool = False):
    if backward:
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        grad = torch.randn_like(out)

        def step():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(grad)
        return triton.testing.do_bench(step, warmup=5, rep=30)
    with torch.no_grad():
        if graph:  # launch overhead out: how a serving loop replays decode
            return triton.testing.do_bench_cudagraph(lambda: fn(*inputs), rep=30)
        return triton.testing.do_bench(lambda: fn(*inputs), warmup=5, rep=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table here (markdown)")
    parser.add_argument("--quick", action="store_true", help="only the smallest shapes")
    parser.add_argument("--cases", nargs="+", metavar="LABEL", help="only the cases of these labels, e.g. 'causal S=4096'")
    parser.add_argument("--skip", nargs="+", default=[], metavar="PREFIX",
                        help="leave out the peers whose names start so, e.g. 'flex' (a row says so)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [  # (label, batch, sq, sk, window, q_start)
        ("causal S=4096", 1, 4096, 4096, None, 0),
        ("causal S=16384", 1, 16384, 16384, None, 0),
        ("causal S=65536", 1, 65536, 65536, None, 0),
        ("window 128 S=4096", 1, 4096, 4096, 128, 0),
        ("window 128 S=65536", 1, 65536, 65536, 128, 0),
        ("decode B=64 KV=8192", 64, 1, 8192, None, 8191),
        ("decode B=1 KV=131072", 1, 1, 131072, None, 131071),
    ]
    if args.quick:
        cases = cases[:1] + cases[3:4] + cases[5:6]
    if args.cases:
        unknown = set(args.cases) - {c[0] for c in cases}
        if unknown:
            parser.error(f"unknown case(s) {sorted(unknown)}; known: {[c[0] for c in cases]}")
        cases = [c for c in cases if c[0] in args.cases]
    copy_bw = copy_bandwidth()
    head = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {torch.cuda.get_device_name()}, "
            f"torch {torch.__version__}, triton {triton.__version__}; bf16, {HQ} q / {HKV} kv heads, head_dim {D}; "
            f"copy bandwidth measured in this run {copy_bw / 1e12:.2f} TB/s (read + written); backward TFLOP/s "
            f"count 3.5x the forward's FLOPs over fwd+bwd")
    rows = []
    for label, b, sq, sk, window, q_start in cases:
        q = torch.randn(b, sq, HQ, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, sk, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, sk, HKV, D, device="cuda", dtype=torch.bfloat16)
        sinks = (torch.randn(HQ, device="cuda") * 5).to(torch.bfloat16)
        flops = 4 * b * HQ * D * visible_pairs(sq, sk, window, q_start)
        kv_bytes = 2 * b * sk * HKV * D * 2
        ours = lambda q, k, v, s: fused_attention(q, k, v, s, window=window, q_start=q_start)  # noqa: E731
        short = flops < SHORT_FLOPS  # launch overhead matters: also replayed as CUDA graphs, ours and FA4
        fa4 = make_fa4(window)
        peers = {
            "ours (Triton)": ours,
            "FlashAttention-4 (CuTe DSL)": fa4,
            "ours (Triton), CUDA graph": ours if short else None,
            "FlashAttention-4, CUDA graph": fa4 if short and not isinstance(fa4, str) else None,
            "flex + LSE sink": make_flex(sq, sk, window, q_start),
            "SDPA flash, no sinks" + (", no window" if window else ""):
                (lambda q, k, v, s: sdpa(q, k, v)) if sq == sk else None,
            "eager (transformers' math)": (lambda q, k, v, s: eager(q, k, v, s, window, q_start))
                if b * HQ * sq * sk <= 64 * 8192 * 8192 else None,
        }
        for name in peers:
            if any(name.startswith(prefix) for prefix in args.skip):
                peers[name] = "left out of this run (--skip)"
        for name, fn in peers.items():
            for backward in (False, True):
                if fn is None and "CUDA graph" in name:
                    continue
                if fn is None or isinstance(fn, str):
                    if not (backward and sq == 1):
                        rows.append((label, name, "fwd+bwd" if backward else "fwd",
                                     fn or "skipped (too large or n/a)", "", "", ""))
                    continue
                if backward and (sq == 1 or "CUDA graph" in name):  # graphs replay the forward only
                    continue
                try:
                    ms = bench(fn, backward, (q, k, v, sinks), graph="CUDA graph" in name)
                except Exception as err:  # noqa: BLE001 - a peer that cannot run at a size is reported
                    rows.append((label, name, "fwd+bwd" if backward else "fwd",
                                 f"failed: {type(err).__name__}: {err}"[:160], "", "", ""))
                    torch.cuda.empty_cache()
                    continue
                work = flops * (3.5 if backward else 1.0)
                bw = f"{kv_bytes / (ms * 1e-3) / copy_bw:.0%} of copy" if sq == 1 else ""
                vs_ours = ""
                if name.startswith("FlashAttention-4") and not backward:
                    with torch.no_grad():
                        mine = ours(q, k, v, sinks).float()
                        vs_ours = f"{((fn(q, k, v, sinks).float() - mine).norm() / mine.norm()).item():.1e}"
                rows.append((label, name, "fwd+bwd" if backward else "fwd", f"{ms:.3f}",
                             f"{work / (ms * 1e-3) / 1e12:.0f}", bw, vs_ours))
                print(rows[-1], flush=True)
        del q, k, v
        torch.cuda.empty_cache()
        write_table(args.out, head, rows)
    print(write_table(args.out, head, rows))


def write_table(path, head, rows) -> str:
    """The table so far, written atomically (temp name, then rename) when a path is given."""
    text = head + "\n\n" + tabulate(rows, headers=["case", "implementation", "pass", "ms", "TFLOP/s", "decode BW",
                                                    "FA4 vs ours"], tablefmt="github") + "\n"
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return text


if __name__ == "__main__":
    main()
