"""Where a Megatron checkpoint's files are, and what parallel layout and model they hold.

Shared by both layouts: the tracker file and iteration directories, our sidecar
(`gptoss_verify_megatron.json`), the model spec (from the sidecar, else an HF `config.json`
beside the checkpoint), and `Layout`, the tp/ep/pp sizes with the ranks, stages and experts they
imply.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from ...config import ConfigError, ModelSpec, unique_keys
from ...dtypes import dtype_name
from ..errors import CheckpointError
from ..plausible import check_fits
from .mapping import padded_vocab_size

SIDECAR = "gptoss_verify_megatron.json"
TRACKER = "latest_checkpointed_iteration.txt"
ITERATION = 0


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    pp: int = 1
    pad_vocab: bool = False

    def check(self, spec: ModelSpec) -> None:
        """Refuse sizes that do not divide, naming the value."""
        for name, value in (("tp", self.tp), ("ep", self.ep), ("pp", self.pp)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"megatron: {name} must be a positive integer, got {value!r}")
        if spec.num_kv_heads % self.tp:
            raise CheckpointError(f"megatron: tp={self.tp} must divide the {spec.num_kv_heads} KV heads "
                                  "(the fused QKV is split by whole query groups)")
        if spec.num_experts % self.ep:
            raise CheckpointError(f"megatron: ep={self.ep} must divide the {spec.num_experts} experts")
        if spec.num_layers % self.pp:
            raise CheckpointError(f"megatron: pp={self.pp} must divide the {spec.num_layers} layers")
        if padded_vocab_size(spec.vocab_size, self.tp, self.pad_vocab) % self.tp:
            raise CheckpointError(f"megatron: tp={self.tp} must divide the vocabulary of {spec.vocab_size} rows "
                                  "(pass pad_vocab to pad it the way Megatron-LM does)")

    def vocab(self, spec: ModelSpec) -> int:
        return padded_vocab_size(spec.vocab_size, self.tp, self.pad_vocab)

    def ranks(self) -> list[tuple[int, int, int]]:
        """(t, s, p) for every rank file, in directory order."""
        return [(t, s, p) for t in range(self.tp) for s in range(self.pp) for p in range(self.ep)]

    def rank_dir(self, t: int, s: int, p: int) -> str:
        """Megatron-LM's `get_checkpoint_name`: tensor rank, then pipeline rank, then expert rank."""
        name = f"mp_rank_{t:02d}"
        if self.pp > 1:
            name += f"_{s:03d}"
        if self.ep > 1:
            name += f"_{p:03d}"
        return name

    def stage_layers(self, spec: ModelSpec, s: int) -> range:
        per = spec.num_layers // self.pp
        return range(s * per, (s + 1) * per)

    def stage_of(self, spec: ModelSpec, layer: int) -> tuple[int, int]:
        """(stage, stage-local index) of a global layer."""
        return divmod(layer, spec.num_layers // self.pp)

    def experts_of(self, spec: ModelSpec, p: int) -> range:
        per = spec.num_experts // self.ep
        return range(p * per, (p + 1) * per)


@dataclasses.dataclass(frozen=True)
class Listed:
    """One stored tensor as `list_tensors` reports it (header only: no data read)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


def find_iter_dir(root: Path, holds: Callable[[Path], bool]) -> Path | None:
    """The iteration directory under `root` that `holds` a checkpoint: `root` itself, the one the
    tracker names (an error if it does not exist), else the newest `iter_*` / `release` that holds one."""
    if holds(root):
        return root
    tracker = root / TRACKER
    if tracker.is_file():
        value = tracker.read_bytes().decode("utf-8", "replace").strip()
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value) or value in (".", ".."):
            raise CheckpointError(f"{tracker}: expected an iteration number or 'release', got {value[:64]!r}")
        cand = root / ("release" if value == "release" else f"iter_{int(value):07d}" if value.isdigit() else value)
        if not cand.is_dir():
            raise CheckpointError(f"{tracker}: names iteration {value!r}, but {str(cand)!r} does not exist")
        if holds(cand):
            return cand
    iters = sorted(c for c in root.iterdir() if c.is_dir() and (c.name.startswith("iter_") or c.name == "release"))
    for cand in reversed(iters):
        if holds(cand):
            return cand
    return None


def read_sidecar(root: Path, iter_dir: Path) -> dict | None:
    for cand in (root / SIDECAR, iter_dir / SIDECAR, iter_dir.parent / SIDECAR):
        if cand.is_file():
            try:
                meta = json.loads(cand.read_text(), object_pairs_hook=unique_keys)
            except ValueError as err:  # UnicodeDecodeError included
                raise CheckpointError(f"{cand}: not valid JSON ({err})") from None
            check_sidecar(cand, meta)
            return meta
    return None


def check_sidecar(path: Path, meta) -> None:
    """The sidecar's fields have the types the readers use (its `spec` is ModelSpec's to check)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key in ("tp", "ep", "pp", "etp", "vocab_size", "padded_vocab_size"):
        value = meta.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{path}: {key}: expected a positive integer, got {value!r}")
    if not isinstance(meta.get("pad_vocab", False), bool):
        raise CheckpointError(f"{path}: pad_vocab: expected true or false, got {meta['pad_vocab']!r}")
    if not isinstance(meta.get("spec", {}), dict):
        raise CheckpointError(f"{path}: spec: expected an object, got {meta['spec']!r}")


def read_spec_beside(root: Path, iter_dir: Path, meta: dict | None, what: str) -> ModelSpec:
    """The model spec: from our sidecar, else from an HF config.json beside the checkpoint."""
    if meta is not None and "spec" in meta:
        try:
            return check_fits(ModelSpec.from_json(meta["spec"]), root, root / SIDECAR)
        except (ConfigError, TypeError) as err:
            raise CheckpointError(f"{root / SIDECAR}: spec: {err}") from None
    for cand in (root / "config.json", iter_dir / "config.json"):
        if cand.is_file():
            try:
                return check_fits(ModelSpec.from_hf_config(cand, name=root.name), root, cand)
            except ConfigError as err:
                raise CheckpointError(f"{cand}: {err}") from None
    raise CheckpointError(f"{root}: no {SIDECAR} and no HF config.json beside the {what}: "
                          "the model's hyperparameters cannot be read from the tensors alone")


def sidecar(fmt: str, spec: ModelSpec, lay: Layout, dtype) -> dict:
    """Our sidecar's fields common to both layouts (each layout adds its own after them)."""
    return {"format": fmt, "written_by": "gptoss-verify", "spec": spec.to_json(),
            "tp": lay.tp, "ep": lay.ep, "pp": lay.pp, "etp": 1, "pad_vocab": lay.pad_vocab,
            "vocab_size": spec.vocab_size, "padded_vocab_size": lay.vocab(spec),
            "dtype": dtype_name(dtype), "iteration": ITERATION}
