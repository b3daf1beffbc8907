"""The comparison: configs field by field, then both checkpoints streamed together tensor by tensor.

Each pair of canonical tensors gets one status:
- `bit-exact`: same form, same bytes;
- `same-values`: the numbers are equal though the bytes are not (a dense side against the exact
  decoding of an MXFP4 side; a bf16 tensor widened to float32; MXFP4 bytes that decode alike);
- `rounding`: equal within the exact rounding of the lower side, and the result says which
  (`B == A.to(bf16)`; `B's blocks/scales are the OCP MXFP4 encoding of A`);
- `differs` / `misshaped`, with a diagnosis when a known transform maps A onto B, else error
  statistics; `missing` (in A, not in B) and `extra` (in B, not in A).
Memory stays bounded: at most the tensors of one layer per side are held (those waiting for
their partner, the q/k/v of a layer, and what the consequence needs for the layer it runs).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from .consequence import Consequence, ConsequenceResult
from .deps import CheckpointError, ModelSpec, dtype_code, megatron_mapping
from .diagnose import Diagnosis, diagnose, diagnose_qkv
from .sources import Side, open_side, same_spec
from .tensors import (MXFP4, ErrorStats, Held, bytes_equal, error_stats, lower_dense_dtype, same_values, units,
                      values_equal)

OK_STATUSES = ("bit-exact", "same-values", "rounding")
# ModelSpec fields, the ones that change the numbers first (docs/numerics.md), then the shapes
NUMERIC_FIELDS = ("sliding_window", "layer_types", "rope_factor", "rope_truncate", "rope_theta",
                  "rope_original_max_position", "rope_beta_fast", "rope_beta_slow", "swiglu_limit",
                  "swiglu_alpha", "rms_norm_eps", "experts_per_token")
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "num_experts")
# fields that do not change what the model computes on a sequence it accepts: reported, not failed
INFO_FIELDS = ("max_position_embeddings",)
_QKV = tuple(f"self_attn.{p}.{k}" for p in ("q_proj", "k_proj", "v_proj") for k in ("weight", "bias"))


@dataclasses.dataclass
class ConfigField:
    field: str
    kind: str  # numerics | shape | info
    a: object
    b: object

    @property
    def same(self) -> bool:
        return self.a == self.b


@dataclasses.dataclass
class TensorResult:
    name: str
    a: str  # form and shape, e.g. "BF16 [8, 64, 192]"
    b: str
    status: str
    how: str = ""  # for same-values / rounding: which side equals what
    diagnosis: Diagnosis | None = None
    stats: ErrorStats | None = None

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    @property
    def layer(self) -> int | None:
        m = re.match(r"model\.layers\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None


@dataclasses.dataclass
class SideInfo:
    path: str
    layout: str
    experts: str  # "MXFP4" or the dense dtype
    dtype: str


@dataclasses.dataclass
class DiffResult:
    a: SideInfo
    b: SideInfo
    config: list[ConfigField]
    tensors: list[TensorResult]
    consequence: ConsequenceResult | None
    error: str | None = None  # a reader failure part way (what was compared up to there stands)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def config_same(self) -> bool:
        return all(f.same for f in self.config if f.kind != "info")

    @property
    def same_model(self) -> bool:
        return self.error is None and self.config_same and all(t.ok for t in self.tensors)

    @property
    def findings(self) -> list[TensorResult]:
        return [t for t in self.tensors if not t.ok]


def compare_configs(a: ModelSpec, b: ModelSpec) -> list[ConfigField]:
    out = []
    for kind, fields in (("numerics", NUMERIC_FIELDS), ("shape", SHAPE_FIELDS), ("info", INFO_FIELDS)):
        for f in fields:
            out.append(ConfigField(f, kind, getattr(a, f), getattr(b, f)))
    return out


def compare_pair(name: str, a: Held, b: Held) -> TensorResult:
    """The status of one pair of canonical tensors, with `how` for the rounding cases."""
    r = TensorResult(name, a.describe(), b.describe(), "differs")
    if a.shape != b.shape:
        r.status = "misshaped"
        return r
    if a.mx and b.mx:
        if bytes_equal(a.blocks, b.blocks) and bytes_equal(a.scales, b.scales):
            r.status = "bit-exact"
        elif same_values(a, b):
            r.status, r.how = "same-values", "blocks/scales differ in bytes but decode to the same values"
        return r
    if a.mx or b.mx:
        mx, dense, mx_side = (a, b, "A") if a.mx else (b, a, "B")
        dense_side = "B" if mx_side == "A" else "A"
        if not dense.tensor.is_floating_point():
            return r
        if same_values(mx, dense):
            r.status, r.how = "same-values", f"{dense_side}'s dense values equal {mx_side}'s MXFP4 decoding exactly"
            return r
        blocks, scales = dense.encoded()
        if bytes_equal(blocks, mx.blocks) and bytes_equal(scales, mx.scales):
            r.status, r.how = "rounding", (f"{mx_side}'s blocks/scales are the OCP MXFP4 encoding of "
                                           f"{dense_side}'s {dense.form} values (byte for byte)")
        return r
    ta, tb = a.tensor, b.tensor
    if ta.dtype == tb.dtype:
        if bytes_equal(ta, tb):
            r.status = "bit-exact"
        elif ta.is_floating_point() and values_equal(ta, tb):
            r.status, r.how = "same-values", "equal numbers, different bytes (signed zeros)"
        return r
    if not (ta.is_floating_point() and tb.is_floating_point()):
        return r
    if values_equal(ta, tb):
        r.status, r.how = "same-values", f"{a.form} and {b.form} hold the same numbers"
        return r
    low = lower_dense_dtype(a.form, b.form)
    high_side, low_side = ("A", "B") if low == tb.dtype else ("B", "A")
    if values_equal(ta, tb, low):
        r.status, r.how = "rounding", f"{low_side} == {high_side}.to({str(low).removeprefix('torch.')}) exactly"
    return r


def _stats(a: Held, b: Held) -> ErrorStats | None:
    if a.shape != b.shape:
        return None
    if not a.mx and not b.mx and not (a.tensor.is_floating_point() and b.tensor.is_floating_point()):
        return error_stats(a.tensor.double(), b.tensor.double(), torch.float64)
    return error_stats(a.dense(), b.dense(), lower_dense_dtype(a.form, b.form))


def _pairs(sa: Side, sb: Side, missing: list[str], extra: list[str]) -> Iterator[tuple[str, Held, Held]]:
    """Both streams walked together, paired by canonical name; the few that arrive out of order
    wait. What never finds a partner ends in `missing` (A only) or `extra` (B only)."""
    ia, ib = units(sa.stream()), units(sb.stream())
    wa: dict[str, Held] = {}
    wb: dict[str, Held] = {}
    a_done = b_done = False
    while not (a_done and b_done):
        for it, waiting, other, which in ((ia, wa, wb, "a"), (ib, wb, wa, "b")):
            if (which == "a" and a_done) or (which == "b" and b_done):
                continue
            item = next(it, None)
            if item is None:
                if which == "a":
                    a_done = True
                else:
                    b_done = True
                continue
            if item.name in other:
                partner = other.pop(item.name)
                yield (item.name, item, partner) if which == "a" else (item.name, partner, item)
            else:
                waiting[item.name] = item
    missing.extend(sorted(wa))
    extra.extend(sorted(wb))


def _side_info(s: Side) -> SideInfo:
    return SideInfo(str(s.path), s.layout, MXFP4 if s.mxfp4 else dtype_code(s.dtype), dtype_code(s.dtype))


def diff(a: str | Path, b: str | Path, *, consequence: bool = True, tokens: int = 32, seed: int = 0,
         consequence_layers: int | None = None, progress: bool = False) -> DiffResult:
    """Compare checkpoint B with checkpoint A (the reference). Raises CheckpointError for input
    that cannot be opened at all; a reader failure part way is recorded in `error`."""
    sa, sb = open_side("A", a), open_side("B", b)
    result = DiffResult(_side_info(sa), _side_info(sb), compare_configs(sa.spec, sb.spec), [], None)
    conseq = Consequence(sa.spec, sb.spec, tokens=tokens, seed=seed, max_layers=consequence_layers) \
        if consequence else None
    missing: list[str] = []
    extra: list[str] = []
    qkv: dict[int, dict[str, tuple[Held, Held, TensorResult]]] = {}
    bar = tqdm(desc="diff", unit="tensor", disable=None if progress else True, leave=False)
    try:
        for name, ha, hb in _pairs(sa, sb, missing, extra):
            r = compare_pair(name, ha, hb)
            if not r.ok:
                r.diagnosis = diagnose(name, ha, hb, sa.spec, sb.spec) if _floating(ha, hb) else None
                r.stats = _stats(ha, hb)
            result.tensors.append(r)
            if conseq is not None:
                conseq.feed(name, ha, hb, identical=r.status in ("bit-exact", "same-values"))
            layer, rest = r.layer, name.split(".", 3)[-1]
            if layer is not None and rest in _QKV:
                group = qkv.setdefault(layer, {})
                group[rest] = (ha, hb, r)
                if len(group) == len(_QKV):
                    _qkv_across(layer, qkv.pop(layer), sa.spec, sb.spec)
            bar.update()
            del ha, hb
    except CheckpointError as err:
        result.error = str(err)
        _reader_diagnosis(result, str(err))
    finally:
        bar.close()
    result.tensors += [TensorResult(n, "present", "absent", "missing") for n in missing]
    result.tensors += [TensorResult(n, "absent", "present", "extra") for n in extra]
    if conseq is not None:
        result.consequence = conseq.finish()
    _note_consistent_relabelling(result)
    return result


def _floating(a: Held, b: Held) -> bool:
    return (a.mx or a.tensor.is_floating_point()) and (b.mx or b.tensor.is_floating_point())


def _qkv_across(layer: int, group: dict[str, tuple[Held, Held, TensorResult]], spec_a: ModelSpec,
                spec_b: ModelSpec) -> None:
    """Head blocks moved between q, k and v: one diagnosis for the layer's differing projections."""
    if not same_spec(spec_a, spec_b) or all(r.ok for _, _, r in group.values()):
        return
    for kind in ("weight", "bias"):
        names = {p: f"self_attn.{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj")}
        if all(group[n][2].ok for n in names.values()) or any(group[n][2].status == "misshaped" for n in names.values()):
            continue
        a = {p: group[n][0].dense() for p, n in names.items()}
        b = {p: group[n][1].dense() for p, n in names.items()}
        found = diagnose_qkv(layer, a, b, spec_a)
        if found is None:
            continue
        for n in names.values():
            r = group[n][2]
            if not r.ok and (r.diagnosis is None or found.transform == "qkv-not-grouped-by-kv-head"):
                r.diagnosis = found


def _reader_diagnosis(result: DiffResult, message: str) -> None:
    """A strict (Megatron) reader refuses non-zero vocabulary padding rows: that is a diagnosis."""
    m = re.search(r"tensor (\S+): vocabulary padding row (\d+)", message)
    if m:
        lm_head = megatron_mapping.name(megatron_mapping.row_of("lm_head.weight")[0].key)
        canonical = "lm_head.weight" if m.group(1).endswith(lm_head) else "model.embed_tokens.weight"
        result.tensors.append(TensorResult(canonical, "-", m.group(1), "differs", diagnosis=Diagnosis(
            "vocab-padding-nonzero", f"padding row {m.group(2)} of {m.group(1)} is not zero (the reader stops there)",
            True, 0.0)))


def _note_consistent_relabelling(result: DiffResult) -> None:
    """Experts and router rows permuted alike in a layer relabel the experts: same function."""
    by_layer: dict[int, dict[str, str]] = {}
    for t in result.findings:
        if t.diagnosis and t.diagnosis.transform in ("experts-permuted", "router-rows-permuted"):
            by_layer.setdefault(t.layer, {})[t.name.split(".", 3)[-1]] = t.diagnosis.detail
    for layer, found in by_layer.items():
        details = set(found.values())
        if len(found) == 6 and len(details) == 1:
            result.notes.append(f"layer {layer}: the router rows and all four expert tensors are permuted alike: "
                                "the experts are relabelled, the layer computes the same function (up to the "
                                "order of the expert sum); the tensors still differ")
