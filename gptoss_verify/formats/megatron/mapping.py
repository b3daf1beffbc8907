"""The one table between GPT-OSS's canonical tensors (`schema.py`) and Megatron-Core's.

Every Megatron tensor name in this project is written here and nowhere else. Each row is one
canonical tensor family and says:
- its Megatron names, per name set: `te` (TransformerEngine layer spec with TEGroupedMLP, what
  Megatron-Bridge writes and what we write) and `local` (megatron-core's local spec with
  SequentialMLP, which the reader accepts too); each as the legacy per-rank name (`{i}` the
  stage-local layer, `{k}` the rank-local expert) and the `torch_dist` global key (layer and
  expert indices become leading axes);
- its transform pair, canonical <-> Megatron, named for what it does (group QKV by KV head,
  [gate; up] halves <-> interleaved, transpose, pad the vocabulary);
- its shard rule: which part of the Megatron tensor each rank holds.
The legacy writer and reader (`legacy.py`), the torch_dist writer and reader (`dist.py`), their
`expected_tensors` and the sharded forward (`distributed/sharded.py`) all read this table; the
rules are those of docs/megatron.md ("Megatron mapping" lists the rows).
"""
from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import torch

from ...config import ModelSpec
from ...schema import canonical_names, layer_shapes, outer_shapes, split_layer_name

TE, LOCAL = "te", "local"
NAME_SETS = (TE, LOCAL)


# ---- the transforms, each written once, both directions ---------------------------------------
def group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Q, K, V rows -> Megatron's fused rows grouped by KV head, `[q heads of g; k_g; v_g]` for each
    group g (any number of whole groups: a TP rank's share or all of them)."""
    n = k.shape[0] // head_dim
    tail = q.shape[1:]
    return torch.cat([q.reshape(n, -1, *tail), k.reshape(n, head_dim, *tail), v.reshape(n, head_dim, *tail)],
                     dim=1).reshape(-1, *tail)


def ungroup_qkv(fused: torch.Tensor, q_per_kv: int, head_dim: int, dim: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `group_qkv` along `dim` (weight rows, or the last axis of the fused
    projection's output, as megatron-core splits it): (q, k, v), each a contiguous copy."""
    dim = dim % fused.dim()
    grouped = fused.unflatten(dim, (-1, (q_per_kv + 2) * head_dim))
    parts = grouped.split([q_per_kv * head_dim, head_dim, head_dim], dim=dim + 1)
    return tuple(p.flatten(dim, dim + 1).clone(memory_format=torch.contiguous_format) for p in parts)


def halves_order(n: int) -> torch.Tensor:
    """Row r of Megatron's `[gate; up]` is row `halves_order(n)[r]` of HF's interleaved
    gate/up (gate on even rows, up on odd): a source can gather rows in this order directly."""
    return torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])


def to_halves(interleaved: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """HF's interleaved gate/up along `dim` -> Megatron's `[gate; up]` halves."""
    return interleaved.index_select(dim, halves_order(interleaved.shape[dim]).to(interleaved.device))


def interleave(halves: torch.Tensor, dim: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Megatron's `[gate; up]` halves along `dim` -> HF's interleaved gate/up (into `out` if given)."""
    dim = dim % halves.dim()
    n = halves.shape[dim] // 2
    out = torch.empty_like(halves) if out is None else out
    pairs = out.unflatten(dim, (n, 2))
    pairs.select(dim + 1, 0).copy_(halves.narrow(dim, 0, n))
    pairs.select(dim + 1, 1).copy_(halves.narrow(dim, n, n))
    return out


def padded_vocab_size(vocab: int, tp: int, pad_vocab: bool) -> int:
    """Megatron-LM's `calculate_padded_vocab_size` (divisible by 128·TP), or V unpadded."""
    if not pad_vocab:
        return vocab
    multiple = 128 * tp
    return -(-vocab // multiple) * multiple


def pad_vocab(real: torch.Tensor, rows: int) -> torch.Tensor:
    """Real vocabulary rows followed by zero rows up to `rows` (the padding Megatron-LM appends)."""
    if real.shape[0] == rows:
        return real
    return torch.cat([real, real.new_zeros(rows - real.shape[0], *real.shape[1:])])


def unpad_vocab(shard: torch.Tensor, first_row: int, vocab: int) -> tuple[torch.Tensor, int | None]:
    """(the real rows of a shard that starts at global row `first_row`, the global index of its
    first non-zero padding row or None): padding rows must be zero, the reader says where not."""
    real = max(0, min(shard.shape[0], vocab - first_row))
    pad = shard[real:]
    bad = None
    if pad.numel() and bool((pad != 0).any()):
        bad = first_row + real + int((pad != 0).any(dim=1).nonzero()[0])
    return shard[:real], bad


class Part(NamedTuple):
    """What one rank holds of a row's Megatron tensor: `bounds` (start, stop) along the shard
    axis, in the shard's unit (rows, columns, KV groups), None for all of it; `expert` for expert rows."""
    bounds: tuple[int, int] | None = None
    expert: int | None = None


class Transform:
    """Canonical <-> Megatron for one row. `cut` builds a rank's piece from a random-access source
    (`source.Source`), reading only what the piece needs; `restore` turns a whole Megatron tensor
    back into the canonical tensor(s); expert rows restore expert by expert (`restore_into`,
    Megatron orientation, canonical row order) and hand the stack on as `canonical_view`."""
    name = ""

    def shape(self, canonical: list[tuple[int, ...]], vocab_rows: int) -> tuple[int, ...]:
        return canonical[0]

    def cut(self, src, names: tuple[str, ...], part: Part, axis: int, spec: ModelSpec) -> torch.Tensor:
        name = names[0]
        if part.expert is not None:
            return src.rows(name, part.expert, part.expert + 1)[0]
        if part.bounds is None:
            return src.full(name)
        a, b = part.bounds
        return src.rows(name, a, b) if axis == 0 else src.full(name)[:, a:b].contiguous()

    def restore(self, megatron: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return (megatron,)

    def restore_into(self, out: torch.Tensor, megatron: torch.Tensor) -> None:
        out.copy_(megatron)

    def canonical_view(self, out: torch.Tensor) -> torch.Tensor:
        return out


class Same(Transform):
    name = "same values"


class GroupQKV(Transform):
    name = "group Q, K, V by KV head"

    def shape(self, canonical, vocab_rows):
        return (sum(s[0] for s in canonical), *canonical[0][1:])

    def cut(self, src, names, part, axis, spec):
        d, qpk = spec.head_dim, spec.q_per_kv
        g0, g1 = part.bounds if part.bounds is not None else (0, spec.num_kv_heads)
        q = src.rows(names[0], g0 * qpk * d, g1 * qpk * d)
        k = src.rows(names[1], g0 * d, g1 * d)
        v = src.rows(names[2], g0 * d, g1 * d)
        return group_qkv(q, k, v, d)

    def restore(self, megatron, spec):
        return ungroup_qkv(megatron, spec.q_per_kv, spec.head_dim)


class PadVocab(Transform):
    """Readers unpad as they read (`unpad_vocab`, shard by shard, so they can name the file of a
    non-zero padding row), so `restore` receives the real rows."""
    name = "pad the vocabulary with zero rows"

    def shape(self, canonical, vocab_rows):
        return (vocab_rows, *canonical[0][1:])

    def cut(self, src, names, part, axis, spec):
        a, b = part.bounds
        v = spec.vocab_size
        return pad_vocab(src.rows(names[0], min(a, v), min(b, v)), b - a)


class GateUpHalves(Transform):
    name = "HF interleaved gate/up -> [gate; up] halves"

    def cut(self, src, names, part, axis, spec):
        return to_halves(src.rows(names[0], part.expert, part.expert + 1)[0])

    def restore_into(self, out, megatron):
        interleave(megatron, dim=-1, out=out)


class Transpose(Transform):
    name = "transpose [in, out] -> [out, in]"

    def shape(self, canonical, vocab_rows):
        return canonical[0][::-1]

    def cut(self, src, names, part, axis, spec):
        return src.expert_t(names[0], part.expert)

    def canonical_view(self, out):
        return out.transpose(-1, -2)


class TransposeGateUpHalves(Transpose):
    name = "transpose, and HF interleaved gate/up -> [gate; up] halves"

    def cut(self, src, names, part, axis, spec):
        outputs = src.shape(names[0])[-1]  # canonical [E, in, out]
        return src.expert_t(names[0], part.expert, order=halves_order(outputs))

    def restore_into(self, out, megatron):
        interleave(megatron, dim=-2, out=out)


class Shard(enum.Enum):
    """Which part of a row's Megatron tensor each rank holds."""
    REPLICATED = "replicated: every rank holds all of it, bit-equal copies"
    TP_ROWS = "rows split evenly over TP"
    TP_COLS = "columns split evenly over TP (row-parallel)"
    KV_GROUPS = "whole KV groups per TP rank (column-parallel fused QKV)"
    VOCAB_ROWS = "padded vocabulary rows split evenly over TP"
    EP_EXPERTS = "whole experts, E/EP per EP rank, the same on every TP rank (ETP = 1)"

    @property
    def axis(self) -> int | None:
        """The axis split over TP, None when TP ranks hold copies."""
        return _AXIS.get(self, 0)

    @property
    def varies_with(self) -> str:
        """The rank index a piece's bytes depend on within a stage: "t" (the same on every EP
        rank), "p" (the same on every TP rank) or "" (the same everywhere)."""
        return _VARIES_WITH.get(self, "t")


_AXIS = {Shard.TP_COLS: 1, Shard.REPLICATED: None, Shard.EP_EXPERTS: None}
_VARIES_WITH = {Shard.REPLICATED: "", Shard.EP_EXPERTS: "p"}


FIRST, LAYER, EXPERT, LAST = "first stage", "layer", "expert", "last stage"


class Names(NamedTuple):
    legacy: str  # per-rank name; {i}: stage-local layer, {k}: rank-local expert
    dist: str    # torch_dist global key


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    scope: str                      # FIRST | LAYER | EXPERT | LAST
    canonical: tuple[str, ...]      # canonical names (within `model.layers.{i}.` for layer and expert rows)
    names: Mapping[str, Names]      # name set -> names
    shard: Shard
    transform: Transform

    def legacy_name(self, i: int | None = None, k: int | None = None, names: str = TE) -> str:
        return self.names[names].legacy.format(i=i, k=k)

    def dist_key(self, names: str = TE) -> str:
        return self.names[names].dist

    def shape(self, spec: ModelSpec, vocab_rows: int) -> tuple[int, ...]:
        """The whole Megatron tensor of one layer (of one expert for expert rows)."""
        if self.scope in (FIRST, LAST):
            shapes = outer_shapes(spec)
            return self.transform.shape([shapes[n] for n in self.canonical], vocab_rows)
        shapes = layer_shapes(spec)
        units = [shapes[n][1:] if self.scope == EXPERT else shapes[n] for n in self.canonical]
        return self.transform.shape(units, vocab_rows)

    def piece_shape(self, spec: ModelSpec, vocab_rows: int, tp: int) -> tuple[int, ...]:
        shape = list(self.shape(spec, vocab_rows))
        if self.shard.axis is not None:
            shape[self.shard.axis] //= tp
        return tuple(shape)

    def part(self, spec: ModelSpec, vocab_rows: int, t: int, tp: int, expert: int | None = None) -> Part:
        if self.shard.axis is None:
            return Part(None, expert)
        n = spec.num_kv_heads if self.shard is Shard.KV_GROUPS else self.shape(spec, vocab_rows)[self.shard.axis]
        return Part((t * n // tp, (t + 1) * n // tp), expert)

    def canonical_names(self, layer: int | None) -> tuple[str, ...]:
        return self.canonical if layer is None else tuple(f"model.layers.{layer}.{n}" for n in self.canonical)

    def cut(self, src, spec: ModelSpec, vocab_rows: int, layer: int | None, t: int = 0, tp: int = 1,
            expert: int | None = None) -> torch.Tensor:
        """Rank t's piece of this row (expert `expert` for expert rows), built from the source."""
        return self.transform.cut(src, self.canonical_names(layer), self.part(spec, vocab_rows, t, tp, expert),
                                  self.shard.axis, spec)


def _both(legacy: str, dist: str) -> dict[str, Names]:
    return {TE: Names(legacy, dist), LOCAL: Names(legacy, dist)}


_L = "decoder.layers.{i}."


def _expert(fc: str, field: str) -> dict[str, Names]:
    dist = f"decoder.layers.mlp.experts.experts.{fc}.{field}"
    return {TE: Names(_L + f"mlp.experts.{fc}.{field}{{k}}", dist),
            LOCAL: Names(_L + f"mlp.experts.local_experts.{{k}}.{fc}.{field}", dist)}


def _layer(name: str) -> dict[str, Names]:
    return _both(_L + name, "decoder.layers." + name)


#: The table, in Megatron's file order (a legacy rank file lists its first-stage rows, then each
#: layer's layer rows followed by its expert rows expert by expert, then its last-stage rows).
ROWS: tuple[Row, ...] = (
    Row("embedding", FIRST, ("model.embed_tokens.weight",),
        _both("embedding.word_embeddings.weight", "embedding.word_embeddings.weight"), Shard.VOCAB_ROWS, PadVocab()),
    # the local spec's torch_dist keys of the two norms are TE-style too: its layer spec maps
    # `input_layernorm.` -> `self_attention.linear_qkv.layer_norm_` and `pre_mlp_layernorm.` ->
    # `mlp.linear_fc1.layer_norm_` (gpt_layer_specs.py, `sharded_state_dict_keys_map`)
    Row("input_norm", LAYER, ("input_layernorm.weight",),
        {TE: Names(_L + "self_attention.linear_qkv.layer_norm_weight",
                   "decoder.layers.self_attention.linear_qkv.layer_norm_weight"),
         LOCAL: Names(_L + "input_layernorm.weight", "decoder.layers.self_attention.linear_qkv.layer_norm_weight")},
        Shard.REPLICATED, Same()),
    Row("qkv_weight", LAYER, ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        _layer("self_attention.linear_qkv.weight"), Shard.KV_GROUPS, GroupQKV()),
    Row("qkv_bias", LAYER, ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        _layer("self_attention.linear_qkv.bias"), Shard.KV_GROUPS, GroupQKV()),
    Row("proj_weight", LAYER, ("self_attn.o_proj.weight",),
        _layer("self_attention.linear_proj.weight"), Shard.TP_COLS, Same()),
    Row("proj_bias", LAYER, ("self_attn.o_proj.bias",),
        _layer("self_attention.linear_proj.bias"), Shard.REPLICATED, Same()),
    Row("sinks", LAYER, ("self_attn.sinks",),
        _layer("self_attention.core_attention.softmax_offset"), Shard.TP_ROWS, Same()),
    Row("mlp_norm", LAYER, ("post_attention_layernorm.weight",),
        {TE: Names(_L + "pre_mlp_layernorm.weight", "decoder.layers.pre_mlp_layernorm.weight"),
         LOCAL: Names(_L + "pre_mlp_layernorm.weight", "decoder.layers.mlp.linear_fc1.layer_norm_weight")},
        Shard.REPLICATED, Same()),
    Row("router_weight", LAYER, ("mlp.router.weight",), _layer("mlp.router.weight"), Shard.REPLICATED, Same()),
    Row("router_bias", LAYER, ("mlp.router.bias",), _layer("mlp.router.bias"), Shard.REPLICATED, Same()),
    Row("fc1_weight", EXPERT, ("mlp.experts.gate_up_proj",), _expert("linear_fc1", "weight"),
        Shard.EP_EXPERTS, TransposeGateUpHalves()),
    Row("fc1_bias", EXPERT, ("mlp.experts.gate_up_proj_bias",), _expert("linear_fc1", "bias"),
        Shard.EP_EXPERTS, GateUpHalves()),
    Row("fc2_weight", EXPERT, ("mlp.experts.down_proj",), _expert("linear_fc2", "weight"),
        Shard.EP_EXPERTS, Transpose()),
    Row("fc2_bias", EXPERT, ("mlp.experts.down_proj_bias",), _expert("linear_fc2", "bias"),
        Shard.EP_EXPERTS, Same()),
    Row("final_norm", LAST, ("model.norm.weight",),
        _both("decoder.final_layernorm.weight", "decoder.final_layernorm.weight"), Shard.REPLICATED, Same()),
    Row("output", LAST, ("lm_head.weight",), _both("output_layer.weight", "output_layer.weight"),
        Shard.VOCAB_ROWS, PadVocab()),
)
ROW = {row.key: row for row in ROWS}
#: canonical name (within the layer for layer rows) -> (row, its position in the row's canonical tuple)
_BY_CANONICAL = {n: (row, j) for row in ROWS for j, n in enumerate(row.canonical)}


#: torch_dist keys a name set requests beyond the TE keys we treat as primary: (its key, the row)
DIST_ALIASES: tuple[tuple[str, Row], ...] = tuple(
    (row.dist_key(s), row) for row in ROWS for s in NAME_SETS if s != TE and row.dist_key(s) != row.dist_key(TE))


def name(key: str, i: int | None = None, k: int | None = None, names: str = TE) -> str:
    """The legacy per-rank name of row `key` (stage-local layer i, rank-local expert k)."""
    return ROW[key].legacy_name(i, k, names)


def in_layer(i: int) -> Callable[[str], bool]:
    """Whether a legacy name (TE spelling) belongs to stage-local layer i."""
    prefix = _L.format(i=i)
    return lambda n: n.startswith(prefix)


def row_of(canonical: str) -> tuple[Row, int, int | None]:
    """(row, position in the row's canonical tuple, layer or None) of a full canonical name."""
    split = split_layer_name(canonical)
    layer, rest = (None, canonical) if split is None else split
    row, j = _BY_CANONICAL[rest]
    return row, j, layer


def _pattern(legacy: str) -> re.Pattern:
    return re.compile("^" + re.escape(legacy).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{k\}", r"(?P<k>\d+)") + "$")


#: spellings of other name sets, read back into the TE spelling the readers work in
_RESPELL = [(_pattern(row.names[s].legacy), row) for row in ROWS for s in NAME_SETS
            if s != TE and row.names[s].legacy != row.names[TE].legacy]


def respell(te_name: str, names: str) -> str:
    """A legacy name in the TE spelling -> the same tensor's name in name set `names` (the names
    that the local layer spec's `load_state_dict(strict=True)` asks for, e.g.)."""
    if names == TE:
        return te_name
    for row in ROWS:
        m = _pattern(row.names[TE].legacy).match(te_name)
        if m:
            groups = m.groupdict()
            return row.legacy_name(int(groups["i"]) if "i" in groups else None,
                                   int(groups["k"]) if "k" in groups else None, names)
    return te_name


def is_row(legacy_name: str, keys: tuple[str, ...], names: str = TE) -> bool:
    """Whether a legacy name in name set `names` belongs to one of the rows `keys`."""
    return any(_pattern(ROW[key].names[names].legacy).match(legacy_name) for key in keys)


def normalise(stored: str) -> str | None:
    """A stored legacy name in the TE spelling, or None for entries to ignore (`_extra_state`)."""
    if stored.endswith("_extra_state"):
        return None
    for pattern, row in _RESPELL:
        m = pattern.match(stored)
        if m:
            groups = m.groupdict()
            return row.legacy_name(int(groups["i"]) if "i" in groups else None,
                                   int(groups["k"]) if "k" in groups else None)
    return stored


# ---- Megatron -> canonical, one tensor at a time ----------------------------------------------
def restore_stream(spec: ModelSpec, fetch: Callable[[Row, int | None], torch.Tensor],
                   fetch_experts: Callable[[Row, int, Callable[[object, torch.Tensor], None]], None],
                   dtype: torch.dtype, on_layer: Callable[[int], None] = lambda layer: None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The canonical stream in canonical order from a layout's readers. `fetch(row, layer)` gives
    a row's whole Megatron tensor (vocabulary rows unpadded and checked); `fetch_experts(row,
    layer, put)` calls `put(experts, tensor)` for pieces of an expert row (an index or a slice of
    the expert axis). `on_layer(layer)` is called as a layer's first tensor is asked for."""
    held: dict[str, tuple[torch.Tensor, ...]] = {}
    current = None
    for full in canonical_names(spec):
        row, j, layer = row_of(full)
        if layer is not None and layer != current:
            current = layer
            held.clear()
            on_layer(layer)
        if row.scope == EXPERT:
            out = torch.empty((spec.num_experts, *row.shape(spec, 0)), dtype=dtype)
            fetch_experts(row, layer, lambda experts, t: row.transform.restore_into(out[experts], t))
            yield full, row.transform.canonical_view(out)
            del out
            continue
        if row.key not in held:
            held[row.key] = row.transform.restore(fetch(row, layer), spec)
        parts = held[row.key]
        if j == len(parts) - 1:
            del held[row.key]
        yield full, parts[j]


def markdown_table() -> str:
    """The table as docs/megatron.md ("Megatron mapping") shows it; a test keeps the two equal."""
    lines = ["| row | canonical (in `model.layers.{layer}.` for layer rows) | legacy name: `te` (`local` where it "
             "differs) | torch_dist key | transform | shard |", "|---|---|---|---|---|---|"]
    for row in ROWS:
        te, local = row.names[TE], row.names[LOCAL]
        legacy = f"`{te.legacy}`" + (f" (`{local.legacy}`)" if local.legacy != te.legacy else "")
        dist = f"`{te.dist}`" + (f" (`{local.dist}`)" if local.dist != te.dist else "")
        canonical = ", ".join(f"`{n}`" for n in row.canonical)
        lines.append(f"| `{row.key}` ({row.scope}) | {canonical} | {legacy} | {dist} | {row.transform.name} "
                     f"| {row.shard.value} |")
    return "\n".join(lines) + "\n"


# ---- megatron-core's own model (the megatron-core subject, `subjects/megatron_core`) ------------
#: torch_dist `_extra_state` ShardedObjects a GPT-OSS `GPTModel` requests (FP8 metadata; None in
#: a model without FP8): module key -> whether it has an expert axis besides the layer axis, per
#: name set. Local spec: verified with megatron-core 0.19.2 (its `sharded_state_dict()` asks for
#: exactly these, its own `save` writes them). TE spec: from `megatron/core/extensions/
#: transformer_engine.py` (TELayerNormColumnParallelLinear, TERowParallelLinear,
#: TEDotProductAttention, TEGroupedLinear), not run here.
EXTRA_STATE: dict[str, dict[str, bool]] = {
    LOCAL: {"decoder.layers.self_attention.linear_qkv": False, "decoder.layers.self_attention.linear_proj": False,
            "decoder.layers.mlp.experts.experts.linear_fc1": True, "decoder.layers.mlp.experts.experts.linear_fc2": True},
    TE: {"decoder.layers.self_attention.linear_qkv": False, "decoder.layers.self_attention.linear_proj": False,
         "decoder.layers.self_attention.core_attention": False,
         "decoder.layers.mlp.experts.experts.linear_fc1": True, "decoder.layers.mlp.experts.experts.linear_fc2": True},
}
EXTRA_STATE_SUFFIX = "._extra_state"


def extra_state_keys() -> dict[str, bool]:
    """Every `_extra_state` object key of either name set -> whether it has an expert axis."""
    return {module + EXTRA_STATE_SUFFIX: by_expert for names in NAME_SETS
            for module, by_expert in EXTRA_STATE[names].items()}


#: megatron-core's module paths (local layer spec) where the subject's trace hooks sit: our trace
#: point -> (module path, which layer under `layers` it is relative to, or None for the model)
MODULES = {
    "embed": "embedding",
    "layers": "decoder.layers",
    "final_norm": "decoder.final_layernorm",
    # inside decoder.layers.{i}
    "attn_norm": "input_layernorm",
    "attention_core": "self_attention.core_attention",
    "attention": "self_attention",
    "mlp_norm": "pre_mlp_layernorm",
    "router": "mlp.router",
    "mlp": "mlp",
}
