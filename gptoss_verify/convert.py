"""Conversion between any two layouts, and the round trip SRC -> via -> back with a bit-for-bit diff.

Everything goes through the canonical stream (formats/canonical.py), one tensor at a time. MXFP4
stays MXFP4 where the target can hold it (HF and OpenAI, blocks and scales copied byte for byte);
`dequantize` writes the exactly decoded values instead; a dense source written to the OpenAI
layout is quantised with the OCP MX rule, and the result says so. The round trip compares every
tensor of SRC with the same tensor read back: raw bytes, so -0 vs +0 or a NaN payload counts.
When the via layout cannot hold MXFP4 (Megatron), the MXFP4 source is compared through its exact
bf16 decoding, and the report says so.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from .formats import canonical
from .formats import layout as layouts
from .formats.errors import CheckpointError
from .schema import is_expert_weight
from .formats.fileio.partials import check_destination
from .formats.safetensors_io import check_finite

MEGATRON_OPTIONS = ("tp", "ep", "pp", "pad_vocab")


# ---- memory ---------------------------------------------------------------------------------------
class PeakRSS:
    """Peak resident memory of this process over a block: the kernel's high-water mark (VmHWM),
    reset on entry through /proc/self/clear_refs, with a 5 ms sampler as a fallback."""

    def __enter__(self) -> "PeakRSS":
        self.peak = 0
        self._reset = _reset_hwm()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status_kb("VmRSS"))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kb("VmRSS"))
        if self._reset:
            self.peak = max(self.peak, _status_kb("VmHWM"))
        self.peak_bytes = self.peak * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---- convert --------------------------------------------------------------------------------------
@dataclasses.dataclass
class ConvertResult:
    src: str
    dst: str
    src_layout: str
    dst_layout: str
    tensors: int
    bytes_read: int
    seconds: float
    peak_rss_bytes: int
    notes: list[str]

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds else float("nan")


def check_paths(src: Path, dst: Path) -> None:
    """SRC must exist; DST must differ from SRC, lie outside it, and be absent or empty."""
    if not src.exists():
        raise CheckpointError(f"{src}: source does not exist")
    s, d = src.resolve(), dst.resolve()
    if s == d:
        raise CheckpointError(f"{dst}: destination is the source")
    if s in d.parents:
        raise CheckpointError(f"{dst}: destination lies inside the source {src}")
    if d in s.parents:
        raise CheckpointError(f"{dst}: destination contains the source {src}")
    check_destination(dst)


def check_parallel(spec, tp: int, ep: int, pp: int) -> None:
    """Megatron sizes must divide what they split (docs/megatron.md): tp the KV heads, ep the experts,
    pp the layers. Expert tensor parallelism is always 1."""
    for flag, size, total, what in (("tp", tp, spec.num_kv_heads, "KV heads"), ("ep", ep, spec.num_experts, "experts"),
                                    ("pp", pp, spec.num_layers, "layers")):
        if not isinstance(size, int) or size < 1 or total % size:
            raise CheckpointError(f"--{flag} {size}: must be a positive divisor of the {total} {what}")


def _checked(stream, counter: list[int], where: Path, values: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Count what passes, and refuse NaN/Inf weights or NaN MXFP4 scales (255) by name (`values`:
    for readers that do not check them already, as the safetensors layouts do)."""
    for name, t in stream:
        if values:
            check_finite(t, name, where)
        counter[0] += 1
        counter[1] += t.numel() * t.element_size()
        yield name, t


def _in_place(src: Path, counter: list[int]):
    """An HF checkpoint as a random-access Megatron source; `counter` gets its tensors and bytes."""
    from .formats.megatron.source import SafetensorsSource
    from .formats.safetensors_io import SafetensorsDir
    files = SafetensorsDir(src)
    counter[0] = len(files.tensors)
    counter[1] = sum(t.nbytes for t in files.tensors.values())
    return SafetensorsSource(files)


def convert(src: str | Path, dst: str | Path, to: str, *, tp: int = 1, ep: int = 1, pp: int = 1,
            pad_vocab: bool = False, dequantize: bool = False, mxfp4: bool = False, src_layout: str | None = None,
            megatron_names: str = "te", progress: bool = False) -> ConvertResult:
    """SRC (any layout, detected) -> DST in layout `to`. DST is written atomically. `mxfp4`: write
    the experts of an HF target as MXFP4 even from a dense source (Megatron), quantised with the
    OCP rule: exact for values that came from an OCP-rule encoding, so HF (MXFP4) -> Megatron ->
    HF with `mxfp4` gives the published layout back, byte for byte. `megatron_names`: the name set
    of a `megatron` target, `te` (TransformerEngine's layer spec, Megatron-Bridge's) or `local`
    (megatron-core's local spec)."""
    src, dst = Path(src), Path(dst)
    check_paths(src, dst)
    if to not in layouts.LAYOUTS:
        raise CheckpointError(f"--to: expected one of {sorted(layouts.LAYOUTS)}, got {to!r}")
    src_layout = src_layout or layouts.detect(src)
    source = layouts.module(src_layout)
    if to not in layouts.MXFP4_CAPABLE:
        spec = source.read_spec(src) if hasattr(source, "read_spec") else source.read(src)[0]
        check_parallel(spec, tp, ep, pp)
    if to == "openai" and dequantize:
        raise CheckpointError("--dequantize: the OpenAI layout holds experts only as MXFP4 (OpenAI's loader "
                              "decodes blocks/scales); dequantize to hf or megatron instead")
    if megatron_names != "te" and to != "megatron":
        raise CheckpointError(f"--megatron-names {megatron_names}: only for --to megatron (torch_dist holds "
                              "the keys of both specs)")
    if mxfp4 and (dequantize or to not in layouts.MXFP4_CAPABLE):
        raise CheckpointError(f"--mxfp4: needs an MXFP4 target (hf, openai) and no --dequantize, got --to {to}")
    target = layouts.module(to)
    holds = layouts.holds_mxfp4(src_layout, src)
    notes: list[str] = []
    options: dict = {"progress": progress}
    if to in layouts.MXFP4_CAPABLE:
        options["mxfp4"] = (holds or to == "openai" or mxfp4) and not dequantize
        if (to == "openai" or mxfp4) and not holds and not dequantize:
            notes.append(f"the source holds dense experts: the {to} output stores MXFP4, so the expert "
                         "weights were quantised with the OCP MX rule (lossy unless they came from it; "
                         "use --dequantize for bf16)")
        if holds and dequantize:
            notes.append("MXFP4 experts were decoded to dense weights (exact)")
    else:
        options.update(tp=tp, ep=ep, pp=pp, pad_vocab=pad_vocab)
        if to == "megatron":
            options["names"] = megatron_names
        if holds:
            notes.append(f"the {to} layout cannot hold MXFP4: experts were decoded to dense bf16 (exact)")
    counter = [0, 0]
    start = time.perf_counter()
    with PeakRSS() as mem:
        spec, stream = source.read(src)  # validates every header against the config
        if src_layout == "hf" and to == "megatron":
            # the Megatron writer reads slices many times in its own order: straight from the
            # safetensors files (checked slice by slice) instead of a spooled copy of the stream
            stream.close()
            stream = _in_place(src, counter)
        else:
            stream = _checked(stream, counter, src, values=src_layout not in layouts.MXFP4_CAPABLE)
        target.write(stream, spec, dst, **options)
    return ConvertResult(str(src), str(dst), src_layout, to, counter[0], counter[1],
                         time.perf_counter() - start, mem.peak_bytes, notes)


# ---- round trip -----------------------------------------------------------------------------------
@dataclasses.dataclass
class TensorDiff:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    max_abs_diff: float
    bit_exact: bool
    decoded: bool = False  # compared through the exact decoding of MXFP4

    @property
    def group(self) -> str:
        return re.sub(r"\.(\d+)\.", ".*.", self.name, count=1)


@dataclasses.dataclass
class RoundtripResult:
    src: str
    via: str
    src_layout: str
    legs: list[ConvertResult]
    diffs: list[TensorDiff]
    missing: list[str]
    extra: list[str]
    notes: list[str]
    options: dict

    @property
    def ok(self) -> bool:
        return not self.missing and not self.extra and all(d.bit_exact for d in self.diffs)


def roundtrip(src: str | Path, via: str, *, tp: int = 1, ep: int = 1, pp: int = 1, pad_vocab: bool = False,
              work_dir: str | Path | None = None, keep: bool = False, progress: bool = False) -> RoundtripResult:
    """SRC -> via -> SRC's layout, then every tensor compared bit for bit with SRC."""
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: source does not exist")
    src_layout = layouts.detect(src)
    layouts.module(via)
    tmp = Path(tempfile.mkdtemp(prefix="gptoss-roundtrip-", dir=work_dir))
    opts = dict(tp=tp, ep=ep, pp=pp, pad_vocab=pad_vocab)
    try:
        there = convert(src, tmp / f"via-{via}", via, src_layout=src_layout, progress=progress, **opts)
        back_opts = _source_options(src_layout, src) or opts
        back = convert(tmp / f"via-{via}", tmp / "back", src_layout, src_layout=via, progress=progress,
                       **back_opts)
        # MXFP4 that had to leave MXFP4 on the way and be re-encoded on the way back (an OpenAI
        # source via Megatron) is compared by value: re-encoding need not reproduce another
        # encoder's choice of scale, while the values are exact
        reencoded = src_layout == "openai" and via not in layouts.MXFP4_CAPABLE and layouts.holds_mxfp4(src_layout, src)
        diffs, missing, extra = compare(src, src_layout, tmp / "back", src_layout, progress=progress,
                                        decode=reencoded)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    notes = there.notes + [n for n in back.notes if n not in there.notes]
    if any(d.decoded for d in diffs):
        notes.append(f"the {via} layout holds no MXFP4: the source's MXFP4 experts were compared through "
                     "their decoded values (decoding to bf16 is exact), bit for bit")
    if keep:
        notes.append(f"intermediate checkpoints kept in {tmp}")
    return RoundtripResult(str(src), via, src_layout, [there, back], diffs, missing, extra, notes, opts)


def _source_options(layout: str, path: Path) -> dict:
    """A Megatron source goes back to its own tp/ep/pp (from its module's `options`)."""
    if layout in layouts.MXFP4_CAPABLE:
        return {}
    mod = layouts.module(layout)
    if hasattr(mod, "options"):
        opts = mod.options(path)
        return {k: opts[k] for k in MEGATRON_OPTIONS if k in opts}
    return {}


def compare(a: Path, a_layout: str, b: Path, b_layout: str, progress: bool = False, decode: bool = False
            ) -> tuple[list[TensorDiff], list[str], list[str]]:
    """Every tensor of A against the same-named tensor of B (canonical names). Streams are walked
    together; items that arrive out of order wait in a small buffer. `decode`: compare MXFP4
    experts on both sides through their exact decoding (values, not bytes)."""
    _, sa = layouts.module(a_layout).read(a)
    _, sb = layouts.module(b_layout).read(b)
    decoded: set[str] = set()
    if decode:
        sa, sb = _decoding(sa, decoded), _decoding(sb, decoded)
    waiting_a: dict[str, torch.Tensor] = {}
    waiting_b: dict[str, torch.Tensor] = {}
    diffs: list[TensorDiff] = []
    a_done = b_done = False
    bar = tqdm(desc="compare", unit="tensor", disable=None if progress else True, leave=False)
    while not (a_done and b_done):
        if not a_done:
            item = next(sa, None)
            if item is None:
                a_done = True
            else:
                waiting_a[item[0]] = item[1]
        if not b_done:
            item = next(sb, None)
            if item is None:
                b_done = True
            else:
                waiting_b[item[0]] = item[1]
        for name in [n for n in waiting_a if n in waiting_b]:
            d = tensor_diff(name, waiting_a.pop(name), waiting_b.pop(name))
            diffs.append(dataclasses.replace(d, decoded=True) if name in decoded else d)
            bar.update()
        _pair_mxfp4(waiting_a, waiting_b, diffs)
    bar.close()
    return diffs, sorted(waiting_a), sorted(waiting_b)


def _decoding(stream, decoded: set[str]):
    """Decode MXFP4 experts, adding the names decoded to `decoded` (for the report)."""
    def noting(items):
        for name, t in items:
            if name.endswith("_blocks"):
                decoded.add(name[: -len("_blocks")])
            yield name, t
    return canonical.to_dense(noting(stream))


def _pair_mxfp4(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor], diffs: list[TensorDiff]) -> None:
    """A's blocks+scales against B's dense weight (or the reverse): compare the decoded values."""
    for first, second, a_is_mx in ((wa, wb, True), (wb, wa, False)):
        for dense in [n for n in second if is_expert_weight(n)]:
            blocks, scales = dense + "_blocks", dense + "_scales"
            if blocks in first and scales in first:
                decoded = next(canonical.to_dense([(blocks, first.pop(blocks)), (scales, first.pop(scales))],
                                                  second[dense].dtype))[1]
                other = second.pop(dense)
                d = tensor_diff(dense, decoded, other) if a_is_mx else tensor_diff(dense, other, decoded)
                diffs.append(dataclasses.replace(d, decoded=True))


def tensor_diff(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorDiff:
    from .formats.safetensors_io import dtype_code
    if a.shape != b.shape or a.dtype != b.dtype:
        return TensorDiff(name, tuple(a.shape), f"{dtype_code(a.dtype)} vs {dtype_code(b.dtype)} {list(b.shape)}",
                          a.numel() * a.element_size(), float("inf"), False)
    exact = torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)) if a.numel() else True
    if exact:
        diff = 0.0
    elif a.is_floating_point():
        diff = float((a.double() - b.double()).abs().nan_to_num(float("inf")).max())
    else:
        diff = float((a.long() - b.long()).abs().max())
    return TensorDiff(name, tuple(a.shape), dtype_code(a.dtype), a.numel() * a.element_size(), diff, exact)


# ---- report ---------------------------------------------------------------------------------------
def roundtrip_markdown(result: RoundtripResult) -> str:
    from .report import environment, table
    lines = [f"# Round trip: {result.src_layout} -> {result.via} -> {result.src_layout}", "",
             f"**Verdict: {'PASS (bit-exact)' if result.ok else 'FAIL'}**", "",
             f"Source: `{result.src}`. Options: "
             + ", ".join(f"{k}={v}" for k, v in result.options.items()), ""]
    lines += ["## Environment", "", table(list(environment().items()), ["", ""]), ""]
    legs = [(f"{leg.src_layout} -> {leg.dst_layout}", leg.tensors, f"{leg.bytes_read / 1e9:.3f}",
             f"{leg.seconds:.2f}", f"{leg.gb_per_s:.2f}", f"{leg.peak_rss_bytes / 2**20:.0f}")
            for leg in result.legs]
    lines += ["## Legs", "", table(legs, ["leg", "tensors", "GB read", "seconds", "GB/s", "peak RSS (MiB)"]), ""]
    groups: dict[str, list[TensorDiff]] = {}
    for d in result.diffs:
        groups.setdefault(d.group, []).append(d)
    rows = []
    for group, ds in groups.items():
        shapes = sorted({str(list(d.shape)) for d in ds})
        rows.append((f"`{group}`", len(ds), ", ".join(shapes), ds[0].dtype + (" (decoded MXFP4)" if ds[0].decoded else ""),
                     sum(d.nbytes for d in ds), f"{max(d.max_abs_diff for d in ds):.3g}",
                     "yes" if all(d.bit_exact for d in ds) else "NO"))
    lines += ["## Tensors", "", table(rows, ["tensor group", "count", "shape", "dtype", "bytes",
                                             "max abs diff", "bit-exact"]), ""]
    if result.missing or result.extra:
        lines += ["## Missing or extra after the round trip", ""]
        lines += [f"- missing: `{n}`" for n in result.missing] + [f"- extra: `{n}`" for n in result.extra] + [""]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    return "\n".join(lines)
