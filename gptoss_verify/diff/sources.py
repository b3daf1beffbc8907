"""One side of a diff: a checkpoint in any layout we read, as a stream of canonical (HF name, tensor).

The safetensors layouts (HF, OpenAI original) are read *tolerantly*: a tensor whose shape or
dtype differs from what the config implies is handed on as it is, so the comparison can name it
and the diagnosis can test it (a transposed non-square `down_proj`, a vocabulary cut or padded
without its config); missing and extra names surface in the pairing. The Megatron layouts are
read through their own strict readers, which gather tensor-parallel shards and expert ranks; a
Megatron checkpoint that does not match its sidecar fails with every violation named.
Experts arrive dense (HF module layout `[E, in, out]`) or as MXFP4 `_blocks`/`_scales` pairs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from .deps import (CheckpointError, ModelSpec, SafetensorsDir, canonical_table, is_expert_weight, layouts,
                   openai_layout, table_violations)

TOLERANT = ("hf", "openai")


@dataclasses.dataclass
class Side:
    """A checkpoint opened for reading: its layout, its config, and how its experts are stored."""
    label: str  # "A" or "B"
    path: Path
    layout: str
    spec: ModelSpec
    mxfp4: bool
    dtype: torch.dtype  # the float dtype of its non-expert tensors (the embedding's)

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.layout == "hf":
            return _hf_stream(self)
        if self.layout == "openai":
            return _openai_stream(self)
        return _strict_stream(self)


def same_spec(a: ModelSpec, b: ModelSpec) -> bool:
    """Equal in every architectural number (a spec's `name` is only where it was read from)."""
    return dataclasses.replace(a, name="") == dataclasses.replace(b, name="")


def open_side(label: str, path: str | Path) -> Side:
    """Detect the layout and read the config (a bad config fails here, naming file and field)."""
    path = Path(path)
    name = layouts.detect(path)
    mod = layouts.module(name)
    spec = mod.read_spec(path)
    opts = mod.options(path) if hasattr(mod, "options") else {}
    return Side(label, path, name, spec, bool(opts.get("mxfp4", False)), opts.get("dtype", torch.bfloat16))


def _hf_stream(side: Side) -> Iterator[tuple[str, torch.Tensor]]:
    """The files' tensors in the config's canonical order, then any the config does not name."""
    files = SafetensorsDir(side.path)
    expected = canonical_table(side.spec, mxfp4=side.mxfp4, dtype=side.dtype)
    for name in [n for n in expected if n in files] + [n for n in files.tensors if n not in expected]:
        yield name, files.get(name)


def _openai_stream(side: Side) -> Iterator[tuple[str, torch.Tensor]]:
    """OpenAI names mapped to canonical ones; `attn.qkv` split by rows into q, k, v (q, then k,
    then v, as the layout defines); dense experts turned from [E, out, in] to [E, in, out]."""
    files = SafetensorsDir(side.path)
    spec = side.spec
    q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    seen: set[str] = set()
    parts: dict[str, dict[str, torch.Tensor]] = {}  # weight | bias -> q/k/v of the current layer
    for name in canonical_table(spec, mxfp4=side.mxfp4, dtype=side.dtype):
        rest = name.split(".", 3)[-1]
        proj = rest.split(".")[1] if rest.startswith("self_attn.") else ""
        if proj in openai_layout.QKV:
            layer, kind = name.split(".")[2], rest.rsplit(".", 1)[-1]
            fused_name = f"block.{layer}.attn.qkv.{kind}"
            if fused_name not in files:
                continue
            if proj == "q_proj":
                fused = files.get(fused_name)
                seen.add(fused_name)
                if fused.shape[0] != q_rows + 2 * kv_rows:
                    raise CheckpointError(f"{files.tensors[fused_name].file}: tensor {fused_name}: expected "
                                          f"{q_rows + 2 * kv_rows} rows (q {q_rows}, k and v {kv_rows} each), "
                                          f"got {list(fused.shape)}")
                parts[kind] = dict(zip(openai_layout.QKV, torch.split(fused, [q_rows, kv_rows, kv_rows])))
            yield name, parts[kind][proj].clone()
            continue
        stored = openai_layout.to_openai_name(name)
        if stored not in files:
            continue
        seen.add(stored)
        tensor = files.get(stored)
        if is_expert_weight(name) and tensor.dim() == 3:
            tensor = tensor.transpose(1, 2).contiguous()
        yield name, tensor
    for stored in files.tensors:
        if stored not in seen:
            yield stored, files.get(stored)


def _strict_stream(side: Side) -> Iterator[tuple[str, torch.Tensor]]:
    """A Megatron checkpoint through its own reader, after naming every header violation."""
    mod = layouts.module(side.layout)
    if hasattr(mod, "list_tensors"):
        actual = mod.list_tensors(side.path)
        opts = mod.options(side.path, actual)
        expected = mod.expected_tensors(side.spec, **opts)
        found = table_violations(expected, actual, side.path)
        if found:
            more = f" (and {len(found) - 1} more: " + "; ".join(str(v) for v in found[1:4]) + ")" if len(found) > 1 else ""
            raise CheckpointError(f"{found[0]}{more}")
    _, stream = mod.read(side.path)
    return stream
