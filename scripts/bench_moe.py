"""Benchmark the fused MoE layer next to its peers, all measured in the same run.

Rows per (E, T): ours (bf16 experts; MXFP4 experts), each timed per call (CUDA events) and as a
CUDA-graph replay; transformers' `GptOssMLP` with `experts_implementation` "eager" (the Python loop)
and "grouped_mm"; `torch._grouped_mm` for the two expert GEMMs alone (pre-sorted input, no routing,
no bias, no activation); MXFP4 peers (transformers' MXFP4 experts, OpenAI's `triton_kernels`
`matmul_ogs`) where they can run, else a row saying why not. Columns: ms (median), TFLOP/s of the
expert GEMMs (2·T·k·3·H·I), and the weight-bytes floor: bytes of the experts the routing touched over
the device-to-device copy bandwidth measured at the start of the run (`bench_attention.copy_bandwidth`,
bytes read + written), with floor/ms as a fraction. A summary table puts our two paths next to the
peers per (E, T) (graph replays where the implementation captures, else per call).

    python scripts/bench_moe.py --out reports/moe-bench.md [--experts 32 128] [--tokens 1 16 256 4096 16384]
    python scripts/bench_moe.py --sweep     # time candidate tile shapes instead (SWEEP below)
    python scripts/bench_moe.py --profile   # device time of each of our kernels (torch.profiler)
    python scripts/bench_moe.py --profile --sweep --experts 32 --tokens 1  # ... for each SWEEP candidate
    python scripts/bench_moe.py --backward --experts 32 --tokens 4096   # forward vs forward + backward
    python scripts/bench_moe.py --backward-sweep --experts 32 --tokens 4096  # backward tile shapes (BWD_SWEEP)
    python scripts/bench_moe.py --dry-run [--backward|--sweep|--profile]  # CPU, Triton interpreter, tiny
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

DRY = "--dry-run" in sys.argv  # CPU under the Triton interpreter at tiny sizes: checks the script, times nothing
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import copy_bandwidth  # noqa: E402
from gptoss_verify.kernels import moe as kmoe  # noqa: E402

DEV = "cpu" if DRY else "cuda"
DT = torch.float16 if DRY else torch.bfloat16  # the interpreter misreads bf16 on the CPU
H = I = 64 if DRY else 2880
K = 4
ALPHA, LIMIT = 1.702, 7.0
BANDWIDTH = [0.0]  # bytes/s: the copy bandwidth, measured at the start of the run (main)


def layer(experts, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=DEV) * std).to(DT)

    w = dict(rw=rnd(experts, H, std=H ** -0.5), rb=rnd(experts, std=0.5),
             gu=rnd(experts, H, 2 * I, std=5.0 * H ** -0.5), gub=rnd(experts, 2 * I),
             dn=rnd(experts, I, H, std=0.5 * I ** -0.5), dnb=rnd(experts, H, std=0.5))
    w["gb"] = torch.randint(0, 256, (experts, 2 * I, H // 32, 16), generator=g, device=DEV, dtype=torch.uint8)
    w["gs"] = torch.randint(122, 124, (experts, 2 * I, H // 32), generator=g, device=DEV, dtype=torch.uint8)
    w["db"] = torch.randint(0, 256, (experts, H, I // 32, 16), generator=g, device=DEV, dtype=torch.uint8)
    w["ds"] = torch.randint(117, 119, (experts, H, I // 32), generator=g, device=DEV, dtype=torch.uint8)
    return w


def ours(w, h, fmt, config=None):
    if fmt == "bf16":
        return kmoe._forward(h, w["rw"], w["rb"], w["gu"], None, w["gub"], w["dn"], None, w["dnb"], K, ALPHA, LIMIT,
                             I, False, config)
    return kmoe._forward(h, w["rw"], w["rb"], w["gb"], w["gs"], w["gub"], w["db"], w["ds"], w["dnb"], K, ALPHA,
                         LIMIT, I, True, config)


def sync():
    if not DRY:
        torch.cuda.synchronize()


def time_events(fn):
    if DRY:  # two calls, host clock: proves the call runs, measures nothing
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median")


def time_graph(fn, reps=20):
    if DRY:
        raise RuntimeError("no CUDA graphs in a CPU dry run")
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def hf_mlp(experts, w, impl, train=False):
    """transformers' GptOssMLP holding our tensors (no copies), with the named experts implementation
    (`train`: its parameters require gradients)."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=experts, num_experts_per_tok=K,
                       num_hidden_layers=1, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                       vocab_size=1024)
    cfg._experts_implementation = impl
    with torch.device("meta"):
        mlp = GptOssMLP(cfg)
    mlp.router.weight = torch.nn.Parameter(w["rw"], requires_grad=train)
    mlp.router.bias = torch.nn.Parameter(w["rb"], requires_grad=train)
    for name, key in (("gate_up_proj", "gu"), ("gate_up_proj_bias", "gub"), ("down_proj", "dn"),
                      ("down_proj_bias", "dnb")):
        setattr(mlp.experts, name, torch.nn.Parameter(w[key], requires_grad=train))
    return mlp


def grouped_gemms(w, idx, h):
    """torch._grouped_mm for the two expert GEMMs alone, on inputs already sorted by expert."""
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    x = h[order // K].contiguous()
    offs = torch.bincount(flat, minlength=w["gu"].shape[0]).cumsum(0).to(torch.int32)
    act = torch.empty(x.shape[0], I, device=DEV, dtype=DT).normal_()

    def fn():
        torch._grouped_mm(x, w["gu"], offs=offs)
        torch._grouped_mm(act, w["dn"], offs=offs)
    return fn


def expert_bytes(fmt):
    weights = H * 2 * I + I * H
    per = weights * 2 if fmt == "bf16" else weights // 2 + weights // 32
    return per + (2 * I + H) * 2


def row(impl, fmt, e, t, ms, touched, bandwidth):
    flops = 2 * t * K * 3 * H * I
    floor_ms = touched * expert_bytes(fmt) / bandwidth * 1e3
    return [impl, fmt, e, t, f"{ms:.4f}", f"{flops / ms / 1e9:.1f}", f"{floor_ms:.4f}", f"{floor_ms / ms:.2f}"]


def absent_mxfp4_peers():
    """MXFP4 peers that cannot run here, each with the reason (a peer that runs has no entry)."""
    import importlib.util
    absent = {}
    if importlib.util.find_spec("triton_kernels") is None:
        absent["triton_kernels matmul_ogs (OpenAI)"] = (
            "absent: `triton_kernels` is not importable here (it ships in the triton repository, not in the "
            "triton wheel; no copy consistent with this triton was carried)")
    else:
        absent["triton_kernels matmul_ogs (OpenAI)"] = "absent: importable, but no driver for it is written here yet"
    if importlib.util.find_spec("kernels") is None:
        absent["transformers MXFP4 experts"] = (
            "absent: transformers' MXFP4 path needs the hub `kernels` package (it downloads triton_kernels), "
            "not installed and no network here")
    else:
        absent["transformers MXFP4 experts"] = "absent: `kernels` installed, but it fetches from the hub (no network)"
    return absent


def bench(args, flush, bandwidth):
    rows, summary = [], []
    absent = absent_mxfp4_peers()
    for e in args.experts:
        w = layer(e)
        mlps = {}
        for impl in ("eager", "grouped_mm"):
            try:
                mlps[impl] = hf_mlp(e, w, impl)
            except Exception as exc:  # report, keep going
                mlps[impl] = f"failed to build: {type(exc).__name__}: {exc}"[:160]
                print(f"transformers {impl}: {mlps[impl]}", flush=True)
        for t in args.tokens:
            h = torch.randn(t, H, device=DEV).to(DT)
            idx = ours(w, h, "bf16")[2]
            touched = int(torch.unique(idx).numel())
            best = {}  # implementation -> (ms, how timed) for the summary
            cases = [("ours", "bf16", lambda: ours(w, h, "bf16"), True),
                     ("ours", "mxfp4", lambda: ours(w, h, "mxfp4"), True),
                     ("torch._grouped_mm GEMMs only", "bf16", grouped_gemms(w, idx, h), True)]
            for impl, mlp in mlps.items():
                name = f"transformers {impl}"
                if isinstance(mlp, str):
                    best[name] = (None, mlp)
                elif impl == "eager" and t * e > args.eager_limit:
                    best[name] = (None, "skipped (T·E above --eager-limit)")
                else:
                    cases.append((name, "bf16", (lambda m=mlp: m(h[None])), False))  # per call: may sync the host
            for impl, fmt, fn, graph in cases:
                key = f"{impl} {fmt}" if impl == "ours" else impl
                try:
                    with torch.no_grad():
                        ms = time_events(fn)
                        rows.append(row(impl, fmt, e, t, ms, touched, bandwidth))
                        best[key] = (ms, "per call")
                        print("  ", rows[-1], flush=True)
                        if graph:
                            try:
                                gms = time_graph(fn)
                            except Exception as exc:  # a peer that does not capture: keep its per-call time
                                print(f"{impl} {fmt} E={e} T={t}: no graph: {type(exc).__name__}: {exc}", flush=True)
                                sync()
                            else:
                                rows.append(row(impl + " (graph)", fmt, e, t, gms, touched, bandwidth))
                                best[key] = (gms, "graph")
                                print("  ", rows[-1], flush=True)
                except Exception as exc:
                    best[key] = (None, f"failed: {type(exc).__name__}")
                    print(f"{impl} {fmt} E={e} T={t}: {type(exc).__name__}: {exc}", flush=True)
            for name, why in absent.items():
                best[name] = (None, why)
            summary.append((e, t, touched, best))
            flush(rows, summary)
        del w, mlps
        empty_cache()
    return rows, summary


SUMMARY = ["ours bf16", "ours mxfp4", "torch._grouped_mm GEMMs only", "transformers grouped_mm",
           "transformers eager", "transformers MXFP4 experts", "triton_kernels matmul_ogs (OpenAI)"]


def summary_table(summary, bandwidth):
    """Ours next to the peers per (E, T), plus the two weight-bytes floors; absent peers say why below."""
    lines, reasons = [], {}
    for e, t, touched, best in summary:
        cells = []
        for name in SUMMARY:
            ms, how = best.get(name, (None, "not run"))
            if ms is None:
                reasons.setdefault(name, how)
                cells.append("–")
            else:
                cells.append(f"{ms:.3f}" + (" (g)" if how == "graph" else ""))
        floors = [f"{touched * expert_bytes(f) / bandwidth * 1e3:.4f}" for f in ("bf16", "mxfp4")]
        lines.append([e, t] + cells + floors)
    head = ["E", "T"] + SUMMARY + ["bf16 floor", "MXFP4 floor"]
    text = tabulate(lines, headers=head, tablefmt="github")
    text += "\n\n(g): CUDA-graph replay with an L2 flush before each; otherwise per call (CUDA events). Floors: " \
            f"bytes of the experts the routing touched at {bandwidth / 1e12:.2f} TB/s (copy, measured in this run)."
    for name, why in reasons.items():
        text += f"\n- {name}: {why}"
    return text


def profile(args):
    """Device time per kernel of our forward (torch.profiler, 20 calls each), to place the time;
    with --backward, of forward + backward with bf16 experts (every input's gradient)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    if args.backward:
        return profile_backward(args, ProfilerActivity, torch_profile)
    lines = []
    if args.sweep:  # each candidate of SWEEP at the chosen E and T
        cases = [(e, t, fmt, cfg) for (fmt, e, t), cfgs in SWEEP.items() for cfg in cfgs
                 if (t <= 40 if DRY else e in args.experts and t in args.tokens)]
    else:
        cases = [(e, t, fmt, None) for e in args.experts for t in args.tokens for fmt in ("bf16", "mxfp4")]
    layers = {}
    flush = torch.empty(1 << 10 if DRY else 256 << 20, dtype=torch.int8, device=DEV)  # L2 cold, as in time_graph
    for e, t, fmt, cfg in cases:
        if e not in layers:
            layers.clear()
            empty_cache()
            layers[e] = layer(e)
        w = layers[e]
        h = torch.randn(t, H, device=DEV, generator=torch.Generator(DEV).manual_seed(t)).to(DT)
        with torch.no_grad():
            for _ in range(3):
                ours(w, h, fmt, cfg)
            sync()
            with torch_profile(activities=[ProfilerActivity.CPU if DRY else ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    flush.zero_()
                    ours(w, h, fmt, cfg)
                sync()
        label = fmt if cfg is None else f"{fmt} {cfg}"
        total = 0.0
        for ev in prof.key_averages():
            us = ev.device_time_total / 20 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 20
            if us <= 0 or "FillFunctor" in ev.key or ev.key in ("aten::zero_", "aten::fill_"):  # the flush
                continue
            total += us
            lines.append([e, t, label, ev.key[:60], f"{us:.1f}"])
        lines.append([e, t, label, "sum of kernels", f"{total:.1f}"])
        print(tabulate(lines[-8:], tablefmt="plain"), flush=True)
    return tabulate(lines, headers=["E", "T", "experts", "kernel", "us per call"], tablefmt="github")


def profile_backward(args, activity, torch_profile):
    lines = []
    for e in args.experts:
        w = layer(e)
        for t in args.tokens:
            x = {n: (torch.randn(t, H, device=DEV).to(DT) if n == "h" else w[n]).detach().clone().requires_grad_(True)
                 for n in TRAINABLE["bf16"]}
            grad = torch.randn(t, H, device=DEV).to(DT)

            def step():
                for v in x.values():
                    v.grad = None
                kmoe.fused_moe(x["h"], x["rw"], x["rb"], x["gu"], x["gub"], x["dn"], x["dnb"], k=K, alpha=ALPHA,
                               limit=LIMIT)[0].backward(grad)
            for _ in range(3):
                step()
            sync()
            with torch_profile(activities=[activity.CPU if DRY else activity.CUDA]) as prof:
                for _ in range(10):
                    step()
                sync()
            total = 0.0
            first = len(lines)
            for ev in prof.key_averages():
                us = (ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total) / 10
                if us > 0:
                    total += us
                    lines.append([e, t, "bf16 fwd+bwd", ev.key[:60], f"{us:.1f}"])
            lines.append([e, t, "bf16 fwd+bwd", "sum of kernels", f"{total:.1f}"])
            print(tabulate(lines[first:], tablefmt="plain"), flush=True)
        del w
        empty_cache()
    return tabulate(lines, headers=["E", "T", "experts", "kernel", "us per call"], tablefmt="github")


C = kmoe.MoEConfig
# (experts format, E, T) -> candidate tile shapes; the first of each list is choose_config's pick
G = dict(gemv=True, split_k=4)  # the slot GEMVs (chosen for T·k <= 16): gemv_n1 x gemv_k1 gate_up tiles,
# gemv_n2 x gemv_k2 down tiles (MoEConfig's defaults: 64 x 256 and 32 x 512)
DOWN_WIDE = dict(gemv_n2=64, gemv_k2=256)  # choose_config's down tile above 8 slots


def gemv_tiles(n, k):
    """The same rows x columns tile for both GEMVs (the per-kernel profile tells them apart)."""
    return dict(gemv_n1=n, gemv_k1=k, gemv_n2=n, gemv_k2=k)


SWEEP = {
    ("mxfp4", 32, 1): [C(16, 64, 64, 128, 8, 4, 4, **G),
                       C(16, 64, 64, 128, 8, 4, 4, split_k=4),  # the row-block GEMMs, split over K
                       C(16, 64, 64, 128, 8, 4, 4, **G, **DOWN_WIDE),
                       C(16, 64, 64, 128, 8, 4, 4, **G, gemv_n2=64, gemv_k2=512),
                       C(16, 64, 64, 128, 8, 4, 4, **G, **gemv_tiles(16, 512)),  # the 04b tile (then in [rows, groups] order)
                       C(16, 64, 64, 128, 8, 8, 4, **G),  # 8 warps per GEMV program
                       C(16, 64, 64, 128, 8, 2, 4, **G),  # 2 warps
                       C(16, 64, 64, 128, 8, 4, 4, **G, gemv_n1=32, gemv_k1=256),  # twice the gate_up programs
                       C(16, 64, 64, 128, 8, 8, 4, **G, gemv_n1=128, gemv_k1=256, gemv_n2=64, gemv_k2=512)],
    ("mxfp4", 32, 4): [C(16, 64, 64, 128, 8, 4, 4, **G, **DOWN_WIDE),
                       C(16, 64, 64, 128, 8, 4, 4, split_k=4),
                       C(16, 64, 64, 128, 8, 4, 4, **G),
                       C(16, 64, 64, 128, 8, 4, 4, **G, gemv_n1=128, gemv_k1=128, **DOWN_WIDE),
                       C(16, 64, 64, 128, 8, 4, 4, **G, **gemv_tiles(16, 512)),
                       C(16, 64, 64, 128, 8, 8, 4, **G, **DOWN_WIDE),
                       C(16, 64, 64, 128, 8, 2, 4, **G, **DOWN_WIDE)],
    ("mxfp4", 128, 1): [C(16, 64, 64, 128, 8, 4, 4, **G),
                        C(16, 64, 64, 128, 8, 4, 4, split_k=4),
                        C(16, 64, 64, 128, 8, 4, 4, **G, **gemv_tiles(16, 512))],
    ("bf16", 32, 1): [C(16, 128, 128, 128, 8, 4, 4), C(16, 128, 128, 128, 8, 4, 4, split_k=2),
                      C(16, 64, 64, 128, 8, 4, 4, split_k=4)],
    ("mxfp4", 32, 16): [C(16, 64, 64, 128, 8, 4, 4), C(16, 64, 64, 128, 8, 4, 4, split_k=2),
                        C(16, 128, 128, 128, 8, 4, 4), C(16, 64, 64, 128, 8, 4, 5)],
    ("mxfp4", 32, 4096): [C(256, 128, 128, 64, 8, 8, 3), C(128, 128, 128, 64, 8, 8, 3)],
}


def sweep(args, flush, bandwidth):
    rows = []
    deadline = time.time() + args.sweep_budget
    layers = {}
    for (fmt, e, t), configs in SWEEP.items():
        if not DRY and (e not in args.experts or t not in args.tokens):
            continue
        if e not in layers:
            layers.clear()
            empty_cache()
            layers[e] = layer(e)
        w = layers[e]
        h = torch.randn(t, H, device=DEV).to(DT)
        ref = ours(w, h, fmt, configs[0])[0].float()
        touched = int(torch.unique(ours(w, h, fmt)[2]).numel())
        for cfg in configs:
            if time.time() > deadline:
                print("sweep: out of time", flush=True)
                return rows
            try:
                with torch.no_grad():
                    err = ((ours(w, h, fmt, cfg)[0].float() - ref).norm() / ref.norm()).item()
                    ms = time_graph(lambda: ours(w, h, fmt, cfg))
                rows.append(row(str(cfg), fmt, e, t, ms, touched, bandwidth) + [f"{err:.1e}"])
                print("  ", rows[-1], flush=True)
                flush(rows)
            except Exception as exc:
                print(f"sweep {cfg} {fmt} E={e} T={t}: {type(exc).__name__}: {exc}", flush=True)
    return rows


def empty_cache():
    if not DRY:
        torch.cuda.empty_cache()


TRAINABLE = {"bf16": ("h", "rw", "rb", "gu", "gub", "dn", "dnb"),  # every input
             "mxfp4": ("h", "rw", "rb", "gub", "dnb")}              # MXFP4 experts are frozen


def backward(args, flush, bandwidth):
    """Forward against forward + backward, per call (CUDA events): ours with bf16 experts (gradients of
    every input) and MXFP4 experts (frozen: gradients of h, the router and the biases), and transformers'
    grouped_mm experts through autograd. The loss is Σ out · G; the ratio is to the inference forward."""
    rows = []
    for e in args.experts:
        w = layer(e)
        for t in args.tokens:
            h = torch.randn(t, H, device=DEV).to(DT)
            grad = torch.randn(t, H, device=DEV).to(DT)
            for fmt in ("bf16", "mxfp4"):
                leaves = {n: (h if n == "h" else w[n]).detach().clone().requires_grad_(True) for n in TRAINABLE[fmt]}

                def call(x=leaves, fmt=fmt):
                    if fmt == "bf16":
                        return kmoe.fused_moe(x["h"], x["rw"], x["rb"], x["gu"], x["gub"], x["dn"], x["dnb"], k=K,
                                              alpha=ALPHA, limit=LIMIT)
                    return kmoe.fused_moe_mxfp4(x["h"], x["rw"], x["rb"], w["gb"], w["gs"], x["gub"], w["db"], w["ds"],
                                                x["dnb"], k=K, alpha=ALPHA, limit=LIMIT)
                rows += timed_backward(f"ours {fmt}", e, t, lambda fmt=fmt: ours(w, h, fmt), call, leaves, grad)
                flush(rows)
            try:
                mlp = hf_mlp(e, {n: x.detach().clone() for n, x in w.items()}, "grouped_mm", train=True)
                x = h.detach().clone().requires_grad_(True)
                params = {"h": x, **dict(mlp.named_parameters())}
                rows += timed_backward("transformers grouped_mm", e, t, lambda: mlp(h[None]),
                                       lambda: mlp(x[None]), params, grad[None])
            except Exception as exc:  # a peer that cannot run: its row says why
                rows.append(["transformers grouped_mm", e, t, f"failed: {type(exc).__name__}: {exc}"[:160]] + [""] * 3)
            flush(rows)
            print("  ", rows[-4:], flush=True)
        del w
        empty_cache()
    return rows


B = kmoe.BackwardConfig
# candidate backward tile shapes (bf16 experts, every input trainable); the first is choose_backward_config's
BWD_SWEEP = [B(), B(grad_n=256), B(grad_warps=4), B(grad_warps=4, grad_stages=4), B(grad_k=32, grad_stages=4),
             B(block_n=256), B(num_stages=4), B(swiglu_rows=32, swiglu_n=64), B(bias_n=128)]


def backward_sweep(args, flush, bandwidth):
    """fwd + bwd per call (CUDA events) for each of BWD_SWEEP, with the gradients' largest relative
    difference to the first configuration's (float32 summation order: ~1e-3 in bf16; larger is a bug)."""
    rows = []
    deadline = time.time() + args.sweep_budget
    default = kmoe.choose_backward_config
    for e in args.experts:
        w = layer(e)
        for t in args.tokens:
            h = torch.randn(t, H, device=DEV).to(DT)
            grad = torch.randn(t, H, device=DEV).to(DT)
            leaves = {n: (h if n == "h" else w[n]).detach().clone().requires_grad_(True) for n in TRAINABLE["bf16"]}

            def step(x=leaves):
                for v in x.values():
                    v.grad = None
                kmoe.fused_moe(x["h"], x["rw"], x["rb"], x["gu"], x["gub"], x["dn"], x["dnb"], k=K, alpha=ALPHA,
                               limit=LIMIT)[0].backward(grad)
            first = None
            for cfg in BWD_SWEEP if not DRY else [default()]:
                if time.time() > deadline:
                    print("backward sweep: out of time", flush=True)
                    return rows
                kmoe.choose_backward_config = lambda cfg=cfg: cfg
                try:
                    step()
                    got = {n: x.grad.float().clone() for n, x in leaves.items()}
                    first = first or got
                    diff = max(((got[n] - first[n]).norm() / first[n].norm().clamp_min(1e-30)).item() for n in got)
                    ms = time_events(step)
                    rows.append([str(cfg), e, t, f"{ms:.3f}", f"{diff:.1e}"])
                    print("  ", rows[-1], flush=True)
                    flush(rows)
                except Exception as exc:
                    print(f"backward sweep {cfg} E={e} T={t}: {type(exc).__name__}: {exc}", flush=True)
                finally:
                    kmoe.choose_backward_config = default
        del w
        empty_cache()
    return rows


def timed_backward(name, e, t, infer, call, leaves, grad):
    """[name, E, T, forward ms (inference), forward under autograd ms, forward + backward ms, ratio]."""
    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def step():
        for x in leaves.values():
            x.grad = None
        first(call()).backward(grad)
    with torch.no_grad():
        fwd = time_events(infer)
    fwd_grad = time_events(call)
    both = time_events(step)
    missing = [n for n, x in leaves.items() if x.grad is None]
    note = f" (no gradient reached {', '.join(missing)})" if missing else ""
    return [[name + note, e, t, f"{fwd:.3f}", f"{fwd_grad:.3f}", f"{both:.3f}", f"{both / fwd:.2f}"]]


def header(bandwidth):
    import transformers
    if DRY:
        return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, CPU DRY RUN under the Triton "
                f"interpreter (no numbers to read), torch {torch.__version__}, triton {triton.__version__}, "
                f"transformers {transformers.__version__}, H = I = {H}, top-{K}")
    props = torch.cuda.get_device_properties(0)
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {props.name} "
            f"({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}, "
            f"transformers {transformers.__version__}, H = I = {H}, top-{K}; copy bandwidth measured in this run "
            f"{bandwidth / 1e12:.2f} TB/s (read + written)")


def write(path, text):
    """Write atomically (temp name, then rename), so a cut-off run leaves the last whole table."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=[32, 128])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 4096, 16384])
    p.add_argument("--eager-limit", type=int, default=128 * 16384, help="skip the eager loop above T·E")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-budget", type=float, default=150.0, help="seconds")
    p.add_argument("--profile", action="store_true", help="device time per kernel of ours instead")
    p.add_argument("--backward", action="store_true", help="forward against forward + backward instead")
    p.add_argument("--backward-sweep", action="store_true", help="time the backward's candidate tile shapes")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, H = I = 64: check the script")
    p.add_argument("--out", help="markdown file to write (atomically)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not DRY:
        print("bench_moe: needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    if DRY:
        args.experts = [min(e, 8) for e in args.experts]
        args.tokens = [min(t, 40) for t in args.tokens]
    bandwidth = 1e11 if DRY else copy_bandwidth()
    head = header(bandwidth)
    print(head, flush=True)
    cols = ["implementation", "experts", "E", "T", "ms", "TFLOP/s", "floor ms", "floor/ms"]
    if args.sweep:
        cols = cols + ["rel err vs first"]
    if args.backward:
        cols = ["implementation", "E", "T", "fwd ms (inference)", "fwd ms (autograd)", "fwd+bwd ms",
                "fwd+bwd / fwd"]
    if args.backward_sweep:
        cols = ["backward config", "E", "T", "fwd+bwd ms", "max rel diff of gradients vs first"]

    def flush(rows, summary=None):
        """Rewrite the tables after every step, so a cut-off run still leaves them."""
        text = head + "\n\n"
        if summary:
            text += summary_table(summary, bandwidth) + "\n\n"
        text += tabulate(rows, headers=cols, tablefmt="github") + "\n"
        if args.out:
            write(args.out, text)
        return text

    if args.profile:
        text = head + "\n\n" + profile(args) + "\n"
        if args.out:
            write(args.out, text)
    elif args.sweep:
        text = flush(sweep(args, flush, bandwidth))
    elif args.backward:
        text = flush(backward(args, flush, bandwidth))
    elif args.backward_sweep:
        text = flush(backward_sweep(args, flush, bandwidth))
    else:
        text = flush(*bench(args, flush, bandwidth))
    print(text, flush=True)
    if kmoe._SCALED_FAILED:
        print("tl.dot_scaled failed here; MXFP4 rows used the in-kernel decode:", kmoe._SCALED_FAILED[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
