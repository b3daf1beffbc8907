"""Tile sizes for the fused attention kernels, measured: every candidate (BLOCK_M, BLOCK_N, warps,
stages) per regime at the benchmark's shapes (bf16, 64 q / 8 kv heads, head_dim 64), one table
per regime, fastest first. The winners go into `kernels/attention.py: CONFIGS` by hand, so a
run of the model never autotunes. `--out PATH` also writes the tables (markdown).
"""
from __future__ import annotations

import argparse
import datetime

import torch
import triton
from tabulate import tabulate

from gptoss_verify.kernels.attention import attention_backward, attention_forward

HQ, HKV, D = 64, 8, 64


def tiles(shapes, stages, **extra):
    return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, **extra) for bm, bn, w in shapes for st in stages]


PREFILL = tiles(((128, 64, 8), (128, 128, 8), (128, 64, 4), (64, 64, 4), (64, 128, 4), (128, 32, 4)), (2, 3),
                SPLIT_MASK=True) + tiles(((128, 64, 4), (128, 128, 4), (64, 64, 4)), (4,), SPLIT_MASK=True)
WINDOW = tiles(((64, 64, 4), (64, 32, 4), (32, 64, 4), (128, 64, 4), (32, 32, 4)), (1, 2, 3), SPLIT_MASK=False) + \
    tiles(((64, 64, 4), (64, 32, 4), (32, 64, 4)), (1, 2), SPLIT_MASK=True)
# --wide: a second, wider sweep of the two regimes short of their targets
WIDE_LONG = tiles(((128, 64, 4), (128, 64, 8), (128, 128, 8), (128, 32, 4)), (2, 3, 4, 5), SPLIT_MASK=True)
WIDE_WINDOW = tiles(((64, 64, 2), (64, 64, 4), (32, 64, 2), (64, 32, 2), (32, 32, 2), (64, 128, 4), (128, 128, 8)),
                    (1, 2, 3, 4), SPLIT_MASK=False)
BACKWARD = tiles(((64, 64, 4), (128, 64, 8), (64, 128, 8), (128, 128, 8), (64, 64, 8)), (1, 2, 3))
DECODE = [dict(BLOCK_N=bn, num_warps=w, num_stages=st) for bn in (64, 128) for w in (4, 8) for st in (2, 3, 4)]


def label(cfg):
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "num_warps": "w", "num_stages": "s", "SPLIT_MASK": "split"}
    return " ".join(f"{short[k]}={int(v) if isinstance(v, bool) else v}" for k, v in cfg.items())


def inputs(b, sq, sk):
    torch.manual_seed(0)
    q = torch.randn(b, sq, HQ, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, sk, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return q, k, v, (torch.randn(HQ, device="cuda") * 5).to(torch.bfloat16)


def time_ms(fn):
    try:
        return triton.testing.do_bench(fn, warmup=5, rep=25)
    except Exception as err:  # noqa: BLE001 - a tile that does not fit (shared memory) is reported
        return f"failed: {type(err).__name__}"


def sweep(title, configs, make_fn, flops):
    rows = []
    for cfg in configs:
        ms = time_ms(make_fn(cfg))
        tf = f"{flops / (ms * 1e-3) / 1e12:.0f}" if isinstance(ms, float) else ""
        rows.append((label(cfg), ms if isinstance(ms, str) else round(ms, 4), tf))
    rows.sort(key=lambda r: r[1] if isinstance(r[1], float) else float("inf"))
    return f"### {title}\n\n" + tabulate(rows, headers=["config", "ms", "TFLOP/s"], tablefmt="github")


def causal_flops(sq, window=None):
    pairs = sum(min(i + 1, window or i + 1) for i in range(sq))
    return 4 * HQ * D * pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--wide", action="store_true", help="only the wider sweep of long prefill and the window")
    parser.add_argument("--decode", action="store_true",
                        help="only decode, replayed as a CUDA graph (as a serving loop runs it): tiles x splits, "
                             "against the copy bandwidth measured in this run")
    args = parser.parse_args()
    tables = []
    if args.decode:
        return report(decode_graph_sweep(), args.out)
    if args.wide:
        for sq, window, kind, configs in ((16384, None, "prefill_long", WIDE_LONG),
                                          (65536, 128, "prefill_window", WIDE_WINDOW)):
            q, k, v, s = inputs(1, sq, sq)
            fn = lambda cfg: (lambda: attention_forward(q, k, v, s, window=window, path="prefill",  # noqa: E731
                                                        overrides={kind: cfg}))
            tables.append(sweep(f"{kind}, S={sq}, window={window}", configs, fn, causal_flops(sq, window)))
        return report(tables, args.out)
    for sq, window, kind, configs in ((4096, None, "prefill", PREFILL), (16384, None, "prefill_long", PREFILL),
                                      (65536, 128, "prefill_window", WINDOW)):
        q, k, v, s = inputs(1, sq, sq)
        fn = lambda cfg: (lambda: attention_forward(q, k, v, s, window=window, path="prefill",  # noqa: E731
                                                    overrides={kind: cfg}))
        tables.append(sweep(f"{kind}, S={sq}, window={window}", configs, fn, causal_flops(sq, window)))
    for sq, window in ((4096, None),):
        q, k, v, s = inputs(1, sq, sq)
        out, lse = attention_forward(q, k, v, s, window=window)
        d_out = torch.randn_like(out)
        for kernel in ("bwd_dq", "bwd_dkdv"):
            fn = lambda cfg: (lambda: attention_backward(q, k, v, s, out, lse, d_out, window=window,  # noqa: E731
                                                         q_start=0, k_start=0, overrides={kernel: cfg}))
            tables.append(sweep(f"backward ({kernel} varied, the other at its default), S={sq}, window={window}",
                                BACKWARD, fn, 2.5 * causal_flops(sq, window)))
    for b, sk in ((64, 8192), (1, 131072)):
        q, k, v, s = inputs(b, 1, sk)
        fn = lambda cfg: (lambda: attention_forward(q, k, v, s, window=None, q_start=sk - 1,  # noqa: E731
                                                    overrides={"decode": cfg}))
        tables.append(sweep(f"decode B={b} KV={sk} (automatic splits)", DECODE, fn, 4 * b * HQ * D * sk))
        splits = [1, 2, 4] if b > 8 else [8, 16, 33, 66, 132, 264]
        rows = []
        for n in splits:
            ms = time_ms(lambda: attention_forward(q, k, v, s, window=None, q_start=sk - 1,
                                                   overrides={"decode_splits": n}))
            gbs = 2 * b * sk * HKV * D * 2 / (ms * 1e-3) / 1e9 if isinstance(ms, float) else ""
            rows.append((n, ms, gbs))
        tables.append(f"### decode B={b} KV={sk}, splits\n\n"
                      + tabulate(rows, headers=["splits", "ms", "K/V GB/s"], tablefmt="github"))
    report(tables, args.out)


def decode_graph_sweep():
    """Every decode tile at several key-split counts, each replayed as a CUDA graph, as % of the
    device-to-device copy bandwidth (read + written) measured here."""
    from bench_attention import copy_bandwidth
    ceiling = copy_bandwidth()
    tables = [f"copy bandwidth measured in this run: {ceiling / 1e12:.2f} TB/s"]
    for b, sk, splits in ((1, 131072, (16, 33, 66, 99, 132, 198, 264)), (64, 8192, (1, 2, 4))):
        q, k, v, s = inputs(b, 1, sk)
        kv_bytes = 2 * b * sk * HKV * D * 2
        rows = []
        for cfg in DECODE:
            for n in splits:
                over = {"decode": cfg, "decode_splits": n}
                try:
                    ms = triton.testing.do_bench_cudagraph(
                        lambda: attention_forward(q, k, v, s, window=None, q_start=sk - 1, overrides=over), rep=30)
                except Exception as err:  # noqa: BLE001 - a tile that does not fit is reported
                    rows.append((label(cfg), n, f"failed: {type(err).__name__}", "", ""))
                    continue
                bw = kv_bytes / (ms * 1e-3)
                rows.append((label(cfg), n, round(ms, 4), round(bw / 1e9), f"{100 * bw / ceiling:.0f}%"))
        rows.sort(key=lambda r: r[2] if isinstance(r[2], float) else float("inf"))
        tables.append(f"### decode B={b} KV={sk}, CUDA graph\n\n" + tabulate(
            rows, headers=["config", "splits", "ms", "K/V GB/s", "of copy"], tablefmt="github"))
    return tables


def report(tables, out):
    head = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {torch.cuda.get_device_name()}, "
            f"torch {torch.__version__}, triton {triton.__version__}; bf16, {HQ} q / {HKV} kv heads, head_dim {D}")
    text = head + "\n\n" + "\n\n".join(tables)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
