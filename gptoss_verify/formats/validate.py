"""What a checkpoint should hold, compared with what it holds.

`table_violations` compares the tensors a layout's config implies (name -> shape, dtype) with
what the files' headers say: missing, extra, wrong shape, wrong dtype, each one line naming the
file and tensor. `scan` optionally reads the values: NaN/Inf in float tensors, and the range of
each MXFP4 scale tensor (E8M0 exponents; 255 is NaN in E8M0 and is a violation). `inspect` puts
both together for any layout in the registry.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from . import layout as layouts
from .canonical import TensorTable
from .errors import CheckpointError
from .safetensors_io import dtype_code

E8M0_NAN = 255


@dataclasses.dataclass(frozen=True)
class Violation:
    kind: str  # missing | extra | shape | dtype | nan | inf | scale
    where: str  # file (or directory)
    tensor: str
    expected: str
    actual: str

    def __str__(self) -> str:
        return f"{self.where}: tensor {self.tensor}: {self.kind}: expected {self.expected}, got {self.actual}"


@dataclasses.dataclass
class ScaleRange:
    tensor: str
    min_exponent: int
    max_exponent: int


@dataclasses.dataclass
class InspectResult:
    path: str
    layout: str
    spec: dict
    options: dict
    tensors: int
    bytes: int
    violations: list[Violation]
    scanned: bool
    scale_ranges: list[ScaleRange]

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> dict:
        return {"path": self.path, "layout": self.layout, "ok": self.ok, "spec": self.spec,
                "options": self.options, "tensors": self.tensors, "bytes": self.bytes,
                "scanned": self.scanned, "violations": [dataclasses.asdict(v) | {"message": str(v)}
                                                        for v in self.violations],
                "mxfp4_scale_ranges": [dataclasses.asdict(r) for r in self.scale_ranges]}


def _fmt(shape, dtype) -> str:
    try:
        name = dtype_code(dtype)
    except CheckpointError:
        name = str(dtype)
    return f"{name} {list(shape)}"


def table_violations(expected: TensorTable, actual: Mapping, where: str | Path) -> list[Violation]:
    """`actual` maps names to objects with `.shape`, `.dtype` and optionally `.file`."""
    out: list[Violation] = []
    for name, (shape, dtype) in expected.items():
        info = actual.get(name)
        if info is None:
            out.append(Violation("missing", str(where), name, _fmt(shape, dtype), "absent"))
            continue
        file = str(getattr(info, "file", where))
        if tuple(info.shape) != tuple(shape):
            out.append(Violation("shape", file, name, _fmt(shape, dtype), _fmt(info.shape, info.dtype)))
        elif info.dtype != dtype:
            out.append(Violation("dtype", file, name, _fmt(shape, dtype), _fmt(info.shape, info.dtype)))
    for name, info in actual.items():
        if name not in expected:
            out.append(Violation("extra", str(getattr(info, "file", where)), name, "absent",
                                 _fmt(info.shape, info.dtype)))
    return out


def check_table(expected: TensorTable, actual: Mapping, where: str | Path) -> None:
    """Raise the first violation (strict loading), saying how many more there are."""
    found = table_violations(expected, actual, where)
    if found:
        more = f" (and {len(found) - 1} more; run `gptoss-verify inspect {where}`)" if len(found) > 1 else ""
        raise CheckpointError(f"{found[0]}{more}")


def scan_values(items: Iterable[tuple[str, torch.Tensor]], where: str,
                progress: bool = False, total: int | None = None) -> tuple[list[Violation], list[ScaleRange]]:
    """NaN/Inf in float tensors; E8M0 exponent range of every MXFP4 scale tensor."""
    violations, ranges = [], []
    for name, t in tqdm(items, total=total, desc="scan", unit="tensor", disable=None if progress else True, leave=False):
        if t.is_floating_point():
            nan = inf = 0
            flat = t.reshape(-1)
            for i in range(0, flat.numel(), 1 << 24):  # chunks: no whole-tensor temporaries
                nan += int(torch.isnan(flat[i:i + (1 << 24)]).sum())
                inf += int(torch.isinf(flat[i:i + (1 << 24)]).sum())
            if nan:
                violations.append(Violation("nan", where, name, "finite values", f"{nan} NaN"))
            if inf:
                violations.append(Violation("inf", where, name, "finite values", f"{inf} Inf"))
        elif name.endswith(("_scales", ".scales")) and t.dtype == torch.uint8 and t.numel():
            lo, hi = int(t.min()), int(t.max())
            ranges.append(ScaleRange(name, lo - 127, hi - 127))
            bad = int((t == E8M0_NAN).sum())
            if bad:
                violations.append(Violation("scale", where, name, "E8M0 scales < 255",
                                            f"{bad} scale(s) of 255 (NaN)"))
    return violations, ranges


def inspect(path: str | Path, scan: bool = False, layout: str | None = None, progress: bool = False) -> InspectResult:
    """Detect the layout, check every tensor header against the config, optionally scan values."""
    path = Path(path)
    name = layout or layouts.detect(path)
    mod = layouts.module(name)
    spec = mod.read_spec(path)
    actual = mod.list_tensors(path)
    opts = mod.options(path, actual)
    violations = table_violations(mod.expected_tensors(spec, **opts), actual, path)
    count, nbytes = len(actual), sum(_nbytes(i) for i in actual.values())
    values = _layout_values(mod, path) if scan and not violations else None
    ranges: list[ScaleRange] = []
    if values is not None:
        more, ranges = scan_values(values, str(path), progress, total=count)
        violations += more
    return InspectResult(str(path), name, spec.to_json(), _jsonable(opts), count, nbytes,
                         violations, values is not None, ranges)


def _nbytes(info) -> int:
    n = info.dtype.itemsize
    for s in info.shape:
        n *= s
    return n


def _layout_values(mod, path: Path):
    """Values in the layout's own names when the layout can give them, else the canonical stream."""
    if hasattr(mod, "iter_stored"):
        return mod.iter_stored(path)
    return mod.read(path)[1]


def _jsonable(opts: dict) -> dict:
    return {k: (dtype_code(v) if isinstance(v, torch.dtype) else v) for k, v in opts.items()}
