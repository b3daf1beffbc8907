"""Megatron's `torch_dist` layout (the default of Megatron-LM and Megatron-Bridge), docs/megatron.md.

    <root>/latest_checkpointed_iteration.txt          ("0")
    <root>/iter_0000000/.metadata, __0_0.distcp       (torch.distributed.checkpoint)
    <root>/iter_0000000/metadata.json                 {"sharded_backend": "torch_dist", ...}
    <root>/gptoss_verify_megatron.json                (our sidecar: spec, padding, the tp/ep/pp asked for)

Tensors are global and layout-independent, as Megatron-Bridge saves GPT-OSS: each row of the
mapping table (`mapping.py`) is one key, the layer index a leading axis of size L, the expert
index a second axis; its values are the row's whole Megatron tensor (the legacy layout at
tp = ep = pp = 1, the vocabulary padded as the asked-for tp would pad it).

Written in one process without a process group (`dcp.save(..., no_dist=True)`): the writer holds
the global tensors in memory (torch's FileSystemWriter keeps every tensor of a file until the
file is done). Read region by region through a load planner: one layer of one key at a time.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from tqdm import tqdm

from ...config import ModelSpec
from ..canonical import Stream, TensorTable
from ..errors import CheckpointError
from ..tensor_ops import contiguous
from ..fileio.partials import atomic_directory
from ..safetensors_io import write_json, write_text
from . import mapping
from .dist_metadata import ReproducibleWriter, SafeMetadataReader, failure_text
from .files import ITERATION, SIDECAR, TRACKER, Layout, Listed, find_iter_dir, read_sidecar, read_spec_beside, sidecar
from .mapping import EXPERT, FIRST, LAST, LAYER, ROWS, Row, Shard
from .source import Source, open_source

NAME = "megatron-dist"
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
#: the model's keys start with one of these (a checkpoint may hold optimizer state beside them)
_MODEL_PREFIXES = tuple(sorted({row.dist_key(names).split(".", 1)[0] + "." for row in ROWS
                                for names in mapping.NAME_SETS}))
#: the key order of the global state dict: the rows outside the layers first, then the layer rows
_KEY_ORDER = [row for row in ROWS if row.scope in (FIRST, LAST)] + [row for row in ROWS if row.scope in (LAYER, EXPERT)]


#: what megatron-core's `dist_checkpointing.load` reads besides the model (`serialization.py`,
#: `load_common_state_dict`): the common state as a ShardedObject "common_state" of global shape (1,)
#: (0.17 and later) and as `common.pt` beside it (0.16 requires it; later ones read it first)
COMMON_STATE = {"checkpoint_version": 3.0, "iteration": ITERATION}
COMMON_STATE_KEY = "common_state/shard_0_1"
COMMON_FILE = "common.pt"


def _object_key(key: str, offsets: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """`ShardedObject.unique_key`: where a sharded object lives in the distcp metadata."""
    return f"{key}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}"


def _object(data) -> list:
    """A ShardedObject's value as megatron-core stores it: `torch.save([data])`, which dcp's
    default planner writes for the list itself (when it does not flatten the state dict, which
    would split the list into `<key>.0` entries that megatron-core does not find)."""
    return [data]


def megatron_objects(spec: ModelSpec) -> dict[str, list]:
    """The common state and every `_extra_state` object (None: no FP8) of both name sets
    (`mapping.EXTRA_STATE`), keyed as megatron-core's loader asks for them. With its default
    strictness a key that no model requests is not an error, so one checkpoint serves both specs."""
    L, E = spec.num_layers, spec.num_experts
    out = {}
    for key, by_expert in mapping.extra_state_keys().items():
        for layer in range(L):
            if by_expert:
                for e in range(E):
                    out[_object_key(key, (layer, e), (L, E))] = _object(None)
            else:
                out[_object_key(key, (layer,), (L,))] = _object(None)
    out[COMMON_STATE_KEY] = _object(dict(COMMON_STATE))
    return out


_ALIAS_KEYS = frozenset(key for key, _ in mapping.DIST_ALIASES)


def is_bookkeeping(key: str) -> bool:
    """A key that is not one of our model tensors: an `_extra_state` object, the common state or a
    local-spec alias of one of our tensors."""
    return mapping.EXTRA_STATE_SUFFIX in key or key.startswith("common_state") or key in _ALIAS_KEYS


def _global_shape(row: Row, spec: ModelSpec, vocab_rows: int) -> tuple[int, ...]:
    lead = {FIRST: (), LAST: (), LAYER: (spec.num_layers,), EXPERT: (spec.num_layers, spec.num_experts)}[row.scope]
    return lead + row.shape(spec, vocab_rows)


def expected_tensors(spec: ModelSpec, tp: int = 1, ep: int = 1, pp: int = 1, pad_vocab: bool = False,
                     dtype: torch.dtype = torch.bfloat16, **_ignored) -> TensorTable:
    """Global key -> (global shape, dtype), in the table's row order."""
    lay = Layout(tp, ep, pp, pad_vocab)
    lay.check(spec)
    return {row.dist_key(): (_global_shape(row, spec, lay.vocab(spec)), dtype) for row in ROWS}


# ---- writing ------------------------------------------------------------------------------------
def write(stream: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor] | Source, spec: ModelSpec,
          out_dir: str | Path, *, tp: int = 1, ep: int = 1, pp: int = 1, pad_vocab: bool = False,
          progress: bool = False, **_ignored) -> None:
    """Write the torch_dist layout atomically. Accepts what `legacy.write` accepts (a canonical
    stream, dense or MXFP4, or a mapping). tp/ep/pp only decide the vocabulary padding (and are
    recorded): the tensors themselves are global."""
    lay = Layout(tp, ep, pp, pad_vocab)
    lay.check(spec)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        src = open_source(stream, tmp)  # a spool lives inside the owned partial
        try:
            vp = lay.vocab(spec)
            dtype = src.dtype
            state: dict[str, torch.Tensor] = {}
            L, E = spec.num_layers, spec.num_experts
            bar = tqdm(total=sum(1 if row.scope in (FIRST, LAST) else L for row in ROWS),
                       desc=f"write megatron-dist {out_dir.name}", unit="tensor", disable=not progress, leave=False)
            for row in _KEY_ORDER:
                if row.scope in (FIRST, LAST):
                    state[row.dist_key()] = row.cut(src, spec, vp, None).to(dtype)
                    bar.update()
                    continue
                out = torch.empty(_global_shape(row, spec, vp), dtype=dtype)
                for layer in range(L):
                    if row.scope == EXPERT:
                        for e in range(E):
                            out[layer, e] = row.cut(src, spec, vp, layer, expert=e)
                    else:
                        out[layer] = row.cut(src, spec, vp, layer)
                    bar.update()
                state[row.dist_key()] = out
            bar.close()
            for alias, row in mapping.DIST_ALIASES:  # the local spec's key of the same tensor, stored again
                state[alias] = state[row.dist_key()]
            state.update(megatron_objects(spec))
        finally:
            src.close()
        iter_dir = tmp / f"iter_{ITERATION:07d}"
        iter_dir.mkdir()
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, storage_writer=ReproducibleWriter(str(iter_dir), single_file_per_rank=True, thread_count=1),
                     planner=DefaultSavePlanner(flatten_state_dict=False), no_dist=True)
        del state
        torch.save(dict(COMMON_STATE), iter_dir / COMMON_FILE)
        write_json(iter_dir / "metadata.json", MEGATRON_METADATA)
        write_text(tmp / TRACKER, f"{ITERATION}\n")
        write_json(tmp / SIDECAR, sidecar("megatron-torch_dist", spec, lay, dtype))


# ---- reading ------------------------------------------------------------------------------------
def _holds_dist(d: Path) -> bool:
    md = d / "metadata.json"
    if not (d / ".metadata").is_file() or not md.is_file():
        return False
    try:
        data = json.loads(md.read_text())
    except (ValueError, OSError):  # not JSON (a UnicodeDecodeError is a ValueError)
        return False
    return isinstance(data, dict) and data.get("sharded_backend") == "torch_dist"


def detect(path: str | Path) -> bool:
    path = Path(path)
    try:
        return path.is_dir() and find_iter_dir(path, _holds_dist) is not None
    except (OSError, ValueError):
        return False


def read_spec(path: str | Path) -> ModelSpec:
    return _open(path)[1]


def _open(path: str | Path):
    root = Path(path)
    iter_dir = find_iter_dir(root, _holds_dist) if root.is_dir() else None
    if iter_dir is None:
        raise CheckpointError(f"{root}: no torch_dist checkpoint (.metadata with metadata.json "
                              "sharded_backend torch_dist) found")
    meta = read_sidecar(root, iter_dir) or {}
    spec = read_spec_beside(root, iter_dir, meta, "torch_dist checkpoint")
    reader = SafeMetadataReader(str(iter_dir))
    md = reader.read_metadata()  # one CheckpointError naming the file if corrupt or hostile
    return root, spec, iter_dir, reader, md, meta


def list_tensors(path: str | Path) -> dict:
    _, _, iter_dir, _, md, _ = _open(path)
    out = {}
    for key, item in md.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata) and key.startswith(_MODEL_PREFIXES) and not is_bookkeeping(key):
            out[key] = Listed(tuple(item.size), item.properties.dtype, iter_dir)
    return out


def options(path: str | Path, tensors=None) -> dict:
    _, spec, _, _, md, meta = _open(path)
    emb = md.state_dict_metadata.get(mapping.ROW["embedding"].dist_key())
    vp = emb.size[0] if isinstance(emb, TensorStorageMetadata) else spec.vocab_size
    tp = int(meta.get("tp", 1))
    pad = bool(meta.get("pad_vocab", vp != spec.vocab_size))
    if vp != Layout(tp, 1, 1, pad).vocab(spec):  # no sidecar: find the tp whose padding gives vp
        tp = next((t for t in (1, 2, 4, 8, 16) if Layout(t, 1, 1, True).vocab(spec) == vp), tp)
    dtype = emb.properties.dtype if isinstance(emb, TensorStorageMetadata) else torch.bfloat16
    return {"tp": tp, "ep": int(meta.get("ep", 1)), "pp": int(meta.get("pp", 1)), "pad_vocab": pad, "dtype": dtype}


class _RegionPlanner(DefaultLoadPlanner):
    """Loads given regions (offsets, sizes) of global tensors into tensors of the region's shape."""

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, (offsets, sizes) in self.regions.items():
            md = self.metadata.state_dict_metadata[fqn]
            items += create_read_items_for_chunk_list(
                fqn, md, [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))])
        self.plan = LoadPlan(items)
        return self.plan

    def lookup_tensor(self, index):
        return self.state_dict[index.fqn]


def _load_region(iter_dir: Path, key: str, item: TensorStorageMetadata, offsets, sizes) -> torch.Tensor:
    dest = torch.empty(tuple(sizes), dtype=item.properties.dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({key: dest}, storage_reader=SafeMetadataReader(str(iter_dir)),
                     planner=_RegionPlanner({key: (tuple(offsets), tuple(sizes))}), no_dist=True)
    except (CheckpointError, KeyboardInterrupt):
        raise
    except BaseException as err:  # dcp wraps a failure in CheckpointException, a BaseException
        raise CheckpointError(f"{iter_dir}: cannot read tensor {key} ({failure_text(err)})") from None
    return dest


def read(path: str | Path) -> tuple[ModelSpec, Stream]:
    """(spec, canonical dense stream). The metadata is checked strictly first (missing, extra,
    shape, dtype); values are then read one layer of one key at a time."""
    root, spec, iter_dir, _, md, _ = _open(path)
    opts = options(path)
    expected = expected_tensors(spec, **opts)
    items = dict(md.state_dict_metadata)
    stored: dict[str, str] = {}  # TE key -> the key it is stored under, where they differ
    # a checkpoint written by megatron-core's local spec holds a tensor under its local key only:
    # read it as the TE key (`mapping.DIST_ALIASES`)
    for alias, row in mapping.DIST_ALIASES:
        if row.dist_key() not in items and alias in items:
            items[row.dist_key()] = items[alias]
            stored[row.dist_key()] = alias
    for key, (shape, dtype) in expected.items():
        item = items.get(key)
        if item is None:
            raise CheckpointError(f"{iter_dir}: missing tensor {key} (expected {dtype} {list(shape)})")
        if not isinstance(item, TensorStorageMetadata) or tuple(item.size) != tuple(shape) or item.properties.dtype != dtype:
            got = f"{item.properties.dtype} {list(item.size)}" if isinstance(item, TensorStorageMetadata) else "an object"
            raise CheckpointError(f"{iter_dir}: tensor {key}: expected {dtype} {list(shape)}, got {got}")
    for key, item in items.items():
        if key.startswith(_MODEL_PREFIXES) and not is_bookkeeping(key) and key not in expected:
            raise CheckpointError(f"{iter_dir}: unexpected tensor {key}")
    return spec, _stream(spec, iter_dir, items, stored)


def _stream(spec: ModelSpec, iter_dir: Path, items, stored: dict[str, str]) -> Stream:
    def region(key: str, layer: int | None) -> torch.Tensor:
        """One layer of a layer key, or the whole of a global one."""
        item = items[key]
        key = stored.get(key, key)
        size = tuple(item.size)
        if layer is None:
            return _load_region(iter_dir, key, item, (0,) * len(size), size)
        return _load_region(iter_dir, key, item, (layer,) + (0,) * (len(size) - 1), (1,) + size[1:])[0]

    def fetch(row: Row, layer: int | None) -> torch.Tensor:
        key = row.dist_key()
        t = region(key, layer)
        if row.shard is not Shard.VOCAB_ROWS:
            return t
        real, bad = mapping.unpad_vocab(t, 0, spec.vocab_size)
        if bad is not None:
            raise CheckpointError(f"{iter_dir}: tensor {key}: vocabulary padding row {bad} (of {t.shape[0]}, real "
                                  f"vocabulary {spec.vocab_size}) is not zero")
        return real.clone()

    def fetch_experts(row: Row, layer: int, put) -> None:
        put(slice(None), region(row.dist_key(), layer))

    dtype = items[mapping.ROW["embedding"].dist_key()].properties.dtype
    for name, t in mapping.restore_stream(spec, fetch, fetch_experts, dtype):
        yield name, contiguous(t)  # expert weights come as transposed views; this reader hands on bytes in order
