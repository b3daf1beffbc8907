"""The canonical stream every layout reads to and writes from: HF names, one tensor at a time.

Experts travel either dense (`mlp.experts.gate_up_proj [E,H,2I]`, `down_proj [E,I,H]`, the HF module
layout) or as MXFP4 pairs (`..._blocks [E,out,in/32,16]`, `..._scales [E,out,in/32]`, the HF
checkpoint layout), never both. The two adapters here turn one form into the other on the fly:
decoding is exact; encoding follows the OCP MX rule and is lossy unless the values already lie
on an MXFP4 grid.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from ..config import ModelSpec
from ..schema import canonical_names, canonical_shapes, is_expert_weight, mxfp4_shapes
from . import mxfp4
from .errors import CheckpointError

#: (canonical name, tensor) pairs. A tensor may be a strided view (a reader hands expert weights
#: over in the orientation it holds them, transposed); consumers that need bytes make it contiguous.
Stream = Iterator[tuple[str, torch.Tensor]]
TensorTable = dict[str, tuple[tuple[int, ...], torch.dtype]]


def canonical_table(spec: ModelSpec, mxfp4: bool = False, dtype: torch.dtype = torch.bfloat16) -> TensorTable:
    """Every canonical tensor in stream order with its shape and dtype (the HF checkpoint's own
    table, so the HF layout is this table written to disk)."""
    shapes = canonical_shapes(spec)
    table: TensorTable = {}
    for name in canonical_names(spec):
        if mxfp4 and is_expert_weight(name):
            blocks, scales = mxfp4_shapes(spec, name)
            table[name + "_blocks"] = (blocks, torch.uint8)
            table[name + "_scales"] = (scales, torch.uint8)
        else:
            table[name] = (shapes[name], dtype)
    return table


def to_dense(stream: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype = torch.bfloat16) -> Stream:
    """Decode every MXFP4 pair to the dense HF module weight (exact); other tensors pass through."""
    pending: dict[str, torch.Tensor] = {}
    for name, tensor in stream:
        for suffix in ("_blocks", "_scales"):
            if name.endswith(suffix) and is_expert_weight(name[: -len(suffix)]):
                base = name[: -len(suffix)]
                pending[name] = tensor
                if base + "_blocks" in pending and base + "_scales" in pending:
                    blocks, scales = pending.pop(base + "_blocks"), pending.pop(base + "_scales")
                    try:
                        yield base, mxfp4.to_hf_dense(blocks, scales, dtype)
                    except mxfp4.MXFP4Error as err:
                        raise CheckpointError(f"{base}: {err}") from None
                break
        else:
            yield name, tensor
    if pending:
        raise CheckpointError(f"MXFP4 tensor {next(iter(pending))} came without its blocks/scales partner")


def to_mxfp4(stream: Iterable[tuple[str, torch.Tensor]]) -> Stream:
    """Encode every dense expert weight with the OCP MX rule (lossy); other tensors pass through."""
    for name, tensor in stream:
        if is_expert_weight(name):
            try:
                pairs = _encode_experts(tensor)
                blocks = torch.cat([b for b, _ in pairs])
                scales = torch.cat([s for _, s in pairs])
                del pairs
            except mxfp4.MXFP4Error as err:
                raise CheckpointError(f"{name}: cannot quantise to MXFP4 ({err})") from None
            yield name + "_blocks", blocks
            yield name + "_scales", scales
        else:
            yield name, tensor


def _encode_experts(tensor: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(blocks, scales) of each expert, one expert at a time per thread (so the encoder's float32
    temporaries stay small), on as many threads as cores: the encoder's numpy and torch steps
    release the GIL, and a converter has nothing else for its cores to do meanwhile."""
    experts = range(tensor.shape[0])
    workers = min(os.cpu_count() or 1, len(experts))
    if workers <= 1:
        return [mxfp4.from_hf_dense(tensor[e:e + 1]) for e in experts]
    with ThreadPoolExecutor(workers, thread_name_prefix="mxfp4-encode") as pool:
        return list(pool.map(lambda e: mxfp4.from_hf_dense(tensor[e:e + 1]), experts))


def as_form(stream: Iterable[tuple[str, torch.Tensor]], mxfp4_out: bool, dtype: torch.dtype) -> Stream:
    """The stream in the expert form a writer planned for, float tensors cast to its dtype. MXFP4
    pairs pass through byte for byte when the writer holds MXFP4."""
    adapted = to_mxfp4(stream) if mxfp4_out else to_dense(stream, dtype)
    for name, tensor in adapted:
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        yield name, tensor


def peek(stream: Iterable[tuple[str, torch.Tensor]]) -> tuple[tuple[str, torch.Tensor] | None, Stream]:
    """The first item and a stream that still yields it."""
    it = iter(stream)
    held = [next(it, None)]

    def chained() -> Stream:
        item = held.pop()  # not kept: a held tensor would stay resident for the whole stream
        if item is not None:
            yield item
            del item
        yield from it
    return held[0], chained()


def float_dtype_of(first: tuple[str, torch.Tensor] | None) -> torch.dtype:
    """A writer's float dtype: that of the stream's first float tensor (the embedding), else bf16."""
    if first is not None and first[1].is_floating_point():
        return first[1].dtype
    return torch.bfloat16
