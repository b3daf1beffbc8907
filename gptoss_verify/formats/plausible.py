"""A model description read from a file must fit the bytes stored beside it.

Readers plan per layer (and Megatron's per expert) before reading any tensor, so a config or
sidecar that claims 10^8 layers or 2^40 experts would be taken at its word and cost memory and
time in proportion to the claim, not to the files. Every parameter takes at least half a byte on
disk (MXFP4, the smallest form any layout holds, stores 4.25 bits per value), so a spec whose
parameters cannot fit in the checkpoint's bytes is refused before anything is planned.
"""
from __future__ import annotations

from pathlib import Path

from ..config import ModelSpec
from ..schema import parameter_count
from .errors import CheckpointError


def stored_bytes(root: Path, recursive: bool) -> int:
    files = Path(root).rglob("*") if recursive else Path(root).iterdir()
    return sum(p.stat().st_size for p in files if p.is_file())


def check_fits(spec: ModelSpec, root: str | Path, source: str | Path, recursive: bool = True) -> ModelSpec:
    """`spec` (read from `source`), or one CheckpointError if its parameters cannot fit the files
    under `root` (only those directly in it when not `recursive`)."""
    stored = stored_bytes(Path(root), recursive)
    count = parameter_count(spec)
    if count // 2 > stored:
        raise CheckpointError(f"{source}: describes a model of {count} parameters ({spec.num_layers} layers, "
                              f"{spec.num_experts} experts, hidden {spec.hidden_size}), at least {count // 2} bytes, "
                              f"but the checkpoint holds {stored} bytes")
    return spec
