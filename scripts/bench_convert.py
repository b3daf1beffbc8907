"""Conversion throughput and peak memory on a full-width gpt-oss-20b-architecture checkpoint.

    python scripts/bench_convert.py [--layers 4] [--tp 2] [--ep 4] [--work /tmp] [--keep] [--out PATH]

Builds the published 20B layout (full width, `--layers` layers, MXFP4 experts, vocabulary 201088)
in the HF layout from layout-only synthetic bytes (formats/synthetic.py: the codec and the copies
see the published shapes; the numbers are random), then converts HF -> Megatron (tp x ep, `--to
megatron`) -> HF (`--mxfp4`, back to the published layout), each leg in a fresh child process so
that its peak RSS is its own (the child's VmHWM from /proc; the interpreter and torch count too;
not ru_maxrss, which Linux starts from the parent's RSS at fork). Per leg: bytes read (the source checkpoint's
files) and written (the destination's), the conversion's seconds inside the child, GB/s (source
bytes / seconds) and GB/s of the larger side (the larger of bytes read and written, / seconds:
HF -> Megatron writes 5.4x what it reads), peak RSS, and the issue's targets: >= 0.5 GB/s and
peak RSS <= 2 x the largest tensor + 0.5 GB. `--cold` empties the page cache before each leg
(needs root), so that every byte read comes from the disk. The checkpoints are removed afterwards
unless --keep. Prints a markdown table (and writes it with --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9

_CHILD = """
import json, os, sys, time, torch
from gptoss_verify.convert import convert
kw = json.loads(sys.argv[1])
r = convert(kw.pop("src"), kw.pop("dst"), kw.pop("to"), **kw)
t0 = time.perf_counter()
os.sync()
synced = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("RESULT " + json.dumps({"seconds": r.seconds, "sync_seconds": synced, "stream_bytes": r.bytes_read, "tensors": r.tensors,
                              "peak_rss_in_convert": r.peak_rss_bytes, "vm_hwm": hwm * 1024, "notes": r.notes}))
"""


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_page_cache() -> None:
    """Write back dirty pages and empty the page cache (root only), for a cold-disk leg."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        raise SystemExit(f"--cold: cannot empty the page cache ({err}); run as root or without --cold") from None


def run_leg(src: Path, dst: Path, to: str, cold: bool = False, **options) -> dict:
    """One conversion in a child process: its result, wall time and peak RSS (the child's VmHWM)."""
    os.sync()  # no leg pays for writing back what an earlier step left in the page cache
    if cold:
        drop_page_cache()
    args = json.dumps({"src": str(src), "dst": str(dst), "to": to, **options})
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, args], stdout=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"leg {src.name} -> {dst.name} failed (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    # the child's own high-water mark (VmHWM of its exec'd image): ru_maxrss of a child on Linux
    # starts from the parent's RSS at fork, which would charge it for building the checkpoint
    result.update(wall=wall, peak_rss=result["vm_hwm"], ru_maxrss=usage.ru_maxrss * 1024,
                  read=tree_bytes(src), written=tree_bytes(dst))
    return result


def build(out: Path, layers: int, seed: int) -> tuple[object, int, str]:
    """The HF MXFP4 checkpoint; returns (spec, largest tensor bytes, its name)."""
    from gptoss_verify.config import preset
    from gptoss_verify.formats import hf
    from gptoss_verify.formats.canonical import canonical_table
    from gptoss_verify.formats.synthetic import iter_layout_weights
    spec = preset("gpt-oss-20b").with_layers(layers)
    hf.write(iter_layout_weights(spec, seed=seed, mxfp4=True), spec, out, mxfp4=True)
    # the largest tensor either side holds: the dense expert tensors of the Megatron leg count too
    sizes = {n: s for n, s in _sizes(canonical_table(spec, mxfp4=True))}
    sizes.update(_sizes(canonical_table(spec, mxfp4=False)))
    name = max(sizes, key=sizes.get)
    return spec, sizes[name], name


def _sizes(table):
    for name, (shape, dtype) in table.items():
        n = dtype.itemsize
        for s in shape:
            n *= s
        yield name, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--ep", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--cold", action="store_true", help="empty the page cache before each leg (root)")
    p.add_argument("--out", type=Path, help="also write the markdown report here")
    args = p.parse_args(argv)

    import safetensors
    import torch
    from tabulate import tabulate

    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.work))
    try:
        t0 = time.perf_counter()
        spec, largest, largest_name = build(work / "hf", args.layers, args.seed)
        build_s = time.perf_counter() - t0
        rss_limit = 2 * largest + 0.5 * GB
        legs = [("HF (MXFP4) -> Megatron", run_leg(work / "hf", work / "megatron", "megatron", args.cold,
                                                   tp=args.tp, ep=args.ep)),
                ("Megatron -> HF (MXFP4)", run_leg(work / "megatron", work / "hf-back", "hf", args.cold, mxfp4=True))]
        rows = []
        for name, r in legs:
            larger = max(r["read"], r["written"]) / GB / r["seconds"]
            rows.append([name, f"{r['read'] / GB:.2f}", f"{r['written'] / GB:.2f}", f"{r['seconds']:.1f}",
                         f"{r['sync_seconds']:.1f}", f"{r['wall']:.1f}", f"{r['read'] / GB / r['seconds']:.2f}",
                         f"{r['written'] / GB / r['seconds']:.2f}", f"{larger:.2f}", f"{r['peak_rss'] / GB:.2f}",
                         "yes" if larger >= 0.5 else "no", "yes" if r["peak_rss"] <= rss_limit else "no"])
        same = _same_files(work / "hf", work / "hf-back")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    headers = ["leg", "read GB", "written GB", "seconds", "then sync s", "wall s (child)", "GB/s (read)", "GB/s (written)",
               "GB/s (larger side)", "peak RSS GB", ">= 0.5 GB/s (larger side)", f"RSS <= {rss_limit / GB:.2f} GB"]
    lines = [
        f"# Conversion benchmark: gpt-oss-20b architecture, {spec.num_layers} layers, full width",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {os.cpu_count()}-core CPU "
        f"({platform.processor() or platform.machine()}), {_mem_gb():.0f} GB RAM, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), safetensors {safetensors.__version__}, Python {platform.python_version()}",
        f"- checkpoint: HF layout, MXFP4 experts, vocabulary {spec.vocab_size}, hidden {spec.hidden_size}, "
        f"{spec.num_experts} experts (synthetic bytes: formats/synthetic.py; built in {build_s:.0f} s)",
        f"- Megatron leg: tp={args.tp} x ep={args.ep}, legacy per-rank files (`--to megatron`), experts dense bf16",
        f"- largest tensor: `{largest_name}` {largest / GB:.3f} GB; targets: >= 0.5 GB/s and peak RSS <= 2 x largest "
        f"+ 0.5 GB = {rss_limit / GB:.2f} GB",
        "- seconds: the conversion inside a fresh child process, which starts after `sync` (so it does not pay "
        "for earlier writes); then sync s: the `sync` after it, until the output is on the disk (not in the "
        "GB/s); wall: the child, with starting Python and importing torch and the sync; GB/s (read) = source checkpoint bytes / seconds, (written) = destination bytes / seconds, "
        "(larger side) = the larger of the two / seconds; peak RSS: the child's VmHWM (/proc), "
        "Python and torch included",
        "- page cache: " + ("emptied before each leg (`--cold`): every byte read comes from the disk" if args.cold
                            else "as the previous step left it (leg 2 reads files leg 1 has just written, "
                                 "partly still cached)"),
        f"- round trip: the HF checkpoint that came back is {'byte-identical' if same else 'NOT byte-identical'} "
        "to the source, file by file",
        "",
        tabulate(rows, headers, tablefmt="github"),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if same else 1


def _same_files(a: Path, b: Path) -> bool:
    import filecmp
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def _mem_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 2**20
    except OSError:
        return float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
