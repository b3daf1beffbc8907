"""A canonical tensor as either side holds it (dense, or MXFP4 blocks + scales), and the measures
the diff takes of two of them.

Every measure walks the tensors in bounded chunks along their first dimension (an expert at a
time for the 3-D expert weights), so a full-width 20B expert weight never gets a float64 copy.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator

import torch

from .deps import dtype_code, from_hf_dense, is_expert_weight, to_hf_dense

MXFP4 = "MXFP4"
# lowest first: "within the exact rounding of the lower side" is judged in the lower one
PRECISION = {MXFP4: 0, "BF16": 1, "F16": 2, "F32": 3, "F64": 4}
_CHUNK = 1 << 22  # elements per float64 chunk (32 MB)


@dataclasses.dataclass
class Held:
    """One canonical tensor of one side: `tensor` (dense or any other), or an MXFP4 pair."""
    name: str
    tensor: torch.Tensor | None = None
    blocks: torch.Tensor | None = None
    scales: torch.Tensor | None = None

    @property
    def mx(self) -> bool:
        return self.blocks is not None

    @property
    def form(self) -> str:
        return MXFP4 if self.mx else dtype_code(self.tensor.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense canonical shape (MXFP4 experts: [E, in, out] as the HF module holds them)."""
        if self.mx:
            e, out, groups, half = self.blocks.shape
            return (e, groups * 2 * half, out)
        return tuple(self.tensor.shape)

    def describe(self) -> str:
        if self.mx:
            return f"MXFP4 blocks {list(self.blocks.shape)} + scales {list(self.scales.shape)}"
        return f"{self.form} {list(self.shape)}"

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The values (MXFP4 decoded exactly; float32 unless told, bf16 is exact too)."""
        if self.mx:
            return to_hf_dense(self.blocks, self.scales, dtype or torch.float32)
        return self.tensor if dtype is None else self.tensor.to(dtype)

    def expert(self, e: int) -> "Held":
        """Expert e alone (a view), for comparisons that decode one expert at a time."""
        if self.mx:
            return Held(self.name, blocks=self.blocks[e:e + 1], scales=self.scales[e:e + 1])
        return Held(self.name, tensor=self.tensor[e:e + 1])

    def encoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocks, scales): its own, or the OCP-rule encoding of its dense values."""
        if self.mx:
            return self.blocks, self.scales
        return from_hf_dense(self.tensor)


def units(stream: Iterable[tuple[str, torch.Tensor]]) -> Iterator[Held]:
    """Group a canonical stream into `Held` tensors: an expert weight's `_blocks` and `_scales`
    become one MXFP4 item; a partner that never comes (or a pair of the wrong shapes) passes on
    as plain tensors under their own names."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in stream:
        for suffix in ("_blocks", "_scales"):
            base = name[: -len(suffix)]
            if name.endswith(suffix) and is_expert_weight(base):
                pair = pending.setdefault(base, {})
                pair[suffix] = t
                if len(pair) == 2:
                    del pending[base]
                    blocks, scales = pair["_blocks"], pair["_scales"]
                    if (blocks.dtype == scales.dtype == torch.uint8 and blocks.dim() == 4
                            and blocks.shape[-1] == 16 and blocks.shape[:-1] == scales.shape):
                        yield Held(base, blocks=blocks, scales=scales)
                    else:
                        yield Held(base + "_blocks", tensor=blocks)
                        yield Held(base + "_scales", tensor=scales)
                break
        else:
            yield Held(name, tensor=t)
    for base, pair in pending.items():
        for suffix, t in pair.items():
            yield Held(base + suffix, tensor=t)


def same_values(a: Held, b: Held) -> bool:
    """Equal as numbers, MXFP4 decoded exactly, an expert at a time (no full-width float32 copy)."""
    if a.shape != b.shape:
        return False
    if not (a.mx or b.mx):
        return values_equal(a.tensor, b.tensor)
    return all(values_equal(a.expert(e).dense(), b.expert(e).dense(torch.float32)) for e in range(a.shape[0]))


def lower_form(a: str, b: str) -> str:
    return a if PRECISION.get(a, 9) <= PRECISION.get(b, 9) else b


def lower_dense_dtype(a: str, b: str) -> torch.dtype:
    """The dense dtype in which two forms are compared value for value (MXFP4 decodes exactly to bf16)."""
    low = lower_form(a, b)
    return {MXFP4: torch.bfloat16, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(
        low, torch.float64)


def work_dtype(a: str, b: str) -> torch.dtype:
    """A dtype that holds both sides' values exactly (bf16 when both are bf16 or MXFP4)."""
    if {a, b} <= {MXFP4, "BF16"}:
        return torch.bfloat16
    return torch.float64 if "F64" in (a, b) else torch.float32


def chunk_pairs(x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching float64 chunks of two same-shaped tensors, along the first dimension."""
    if x.dim() == 0:
        yield x.double().reshape(1), y.double().reshape(1)
        return
    row = max(1, math.prod(x.shape[1:]))
    step = max(1, _CHUNK // row)
    for r in range(0, x.shape[0], step):
        yield x[r:r + step].double().reshape(-1), y[r:r + step].double().reshape(-1)


def bytes_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if not x.numel():
        return True
    return torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


def values_equal(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Equal as numbers (NaN never equal), optionally after rounding both to `dtype`; chunked."""
    if x.shape != y.shape:
        return False
    step_rows = max(1, _CHUNK // max(1, math.prod(x.shape[1:]))) if x.dim() else 1
    xs = [x] if x.dim() == 0 else [x[r:r + step_rows] for r in range(0, x.shape[0], step_rows)]
    ys = [y] if y.dim() == 0 else [y[r:r + step_rows] for r in range(0, y.shape[0], step_rows)]
    for a, b in zip(xs, ys):
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        elif a.dtype != b.dtype:
            a, b = a.double(), b.double()
        if not bool((a == b).all()):
            return False
    return True


def rel_l2(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖x − y‖ / ‖y‖ (‖x‖ when y is zero) in float64; NaN anywhere gives inf."""
    num = den_y = den_x = 0.0
    for a, b in chunk_pairs(x, y):
        d = a - b
        num += float((d * d).sum())
        den_y += float((b * b).sum())
        den_x += float((a * a).sum())
    den = den_y or den_x
    if math.isnan(num):
        return math.inf
    return math.sqrt(num / den) if den else (0.0 if num == 0 else math.inf)


@dataclasses.dataclass
class ErrorStats:
    """B against A, as numbers: what a reviewer needs when no known transform explains it."""
    max_abs: float
    rel_l2: float
    differing_share: float
    ulp_dtype: str
    ulp_histogram: dict[str, int]  # ULP distance in the lower dtype -> element count
    nonfinite: int


ULP_BUCKETS = ((0, "0"), (1, "1"), (3, "2-3"), (15, "4-15"), (255, "16-255"), (65535, "256-65535"))


def _ordinals(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Monotone integer images of floats: adjacent representable values differ by 1, ±0 coincide."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}[dtype]
    i = x.to(dtype).view(bits).long()
    sign_mask = {torch.int16: 0x7FFF, torch.int32: 0x7FFFFFFF, torch.int64: 0x7FFFFFFFFFFFFFFF}[bits]
    return torch.where(i < 0, -(i & sign_mask), i)


def error_stats(a: torch.Tensor, b: torch.Tensor, ulp_dtype: torch.dtype) -> ErrorStats:
    """Max |B − A|, relative L2 (to B), share of elements that differ, and the histogram of the
    ULP distance between A and B once both are rounded to `ulp_dtype` (the lower side's)."""
    max_abs = num = den = 0.0
    differing = nonfinite = total = 0
    hist = {label: 0 for _, label in ULP_BUCKETS} | {"more": 0}
    for x, y in chunk_pairs(a, b):
        finite = torch.isfinite(x) & torch.isfinite(y)
        nonfinite += int((~finite).sum())
        d = (x - y).abs()
        if bool(finite.any()):
            max_abs = max(max_abs, float(d[finite].max()))
        num += float((d[finite] ** 2).sum())
        den += float((y[finite] ** 2).sum())
        differing += int((x != y).sum())
        total += x.numel()
        dist = (_ordinals(x, ulp_dtype) - _ordinals(y, ulp_dtype)).abs()
        low = -1
        for high, label in ULP_BUCKETS:
            hist[label] += int(((dist > low) & (dist <= high)).sum())
            low = high
        hist["more"] += int((dist > low).sum())
    return ErrorStats(max_abs, math.sqrt(num / den) if den else (0.0 if num == 0 else math.inf),
                      differing / total if total else 0.0, dtype_code(ulp_dtype), hist, nonfinite)
