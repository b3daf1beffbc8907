"""A torch.distributed.checkpoint `.metadata` file, read without running what it names, and
written without what makes two writes differ.

`.metadata` is a pickle, and torch's `FileSystemReader.read_metadata` loads it with plain
`pickle.load` (torch/distributed/checkpoint/filesystem.py): a crafted file runs any global it
names (`os.system`, ...) the moment a checkpoint is opened. `SafeMetadataReader` is that reader
with an unpickler that resolves only the classes a metadata pickle is made of (the dataclasses of
`torch.distributed.checkpoint.metadata`, the filesystem's `_StorageInfo`, `torch.Size`, torch
dtypes, `torch.serialization._get_layout`, the path classes torch records the checkpoint's
location with) and refuses every other global by name, so a corrupt or hostile file is one clear
error. Every dcp read of ours goes through it (`dcp.load` re-reads the metadata with its reader).

`ReproducibleWriter` leaves the `StorageMeta` out of `.metadata`: torch stores the checkpoint's
(temporary) path and a random save id there, so two writes of one checkpoint would differ; its
readers supply an empty one when it is absent (`read_metadata`, same file).
"""
from __future__ import annotations

import collections
import inspect
import io
import pathlib
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as _md

from ..errors import CheckpointError

METADATA_NAME = ".metadata"
_MAX_METADATA_BYTES = 256 * 2**20  # a 120B model's metadata is a few MB


def _allowed() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        (_md.__name__, name): obj for name, obj in vars(_md).items()
        if inspect.isclass(obj) and obj.__module__ == _md.__name__}
    from torch.distributed.checkpoint import filesystem
    if hasattr(filesystem, "_StorageInfo"):
        allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    # megatron-core's own save records its save plans in the metadata (plain dataclasses and an enum)
    from torch.distributed.checkpoint import planner
    for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"):
        allowed[(planner.__name__, name)] = getattr(planner, name)
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    # torch's own writer records the checkpoint's path in StorageMeta (pathlib._local on Python >= 3.13)
    for module in ("pathlib", "pathlib._local"):
        for name in ("PosixPath", "PurePosixPath", "PureWindowsPath"):
            allowed[(module, name)] = getattr(pathlib, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _Unpickler(pickle.Unpickler):
    allowed = _allowed()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a checkpoint's metadata "
                                         "(refused, not run)") from None


def load_metadata(path: str | Path) -> _md.Metadata:
    """The `Metadata` of a `.metadata` file, unpickled with only the allowed globals; anything else
    is one CheckpointError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > _MAX_METADATA_BYTES:
            raise CheckpointError(f"{path}: {size} bytes, more than a checkpoint's metadata holds")
        md = _Unpickler(io.BytesIO(path.read_bytes())).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as err:  # a corrupt pickle raises many types (UnpicklingError, EOFError, TypeError, ...)
        raise CheckpointError(f"{path}: cannot read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(md, _md.Metadata):
        raise CheckpointError(f"{path}: expected torch.distributed.checkpoint Metadata, got {type(md).__name__}")
    for field in ("state_dict_metadata", "storage_data"):
        if not isinstance(getattr(md, field, None), dict):
            raise CheckpointError(f"{path}: Metadata.{field}: expected a dict, got {type(getattr(md, field, None)).__name__}")
    for key, item in md.state_dict_metadata.items():
        problem = _entry_problem(item)
        if problem:
            raise CheckpointError(f"{path}: state_dict_metadata[{key!r}]: {problem}")
    if getattr(md, "storage_meta", None) is None:  # as torch's reader does
        md.storage_meta = _md.StorageMeta()
    return md


def _ints(value, n: int | None = None) -> bool:
    return (isinstance(value, (tuple, list)) and (n is None or len(value) == n)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _entry_problem(item) -> str | None:
    """What is wrong with one entry, or None: a pickle's BUILD step can give an allowed class any
    attributes, so the fields the readers use are checked here, once."""
    if isinstance(item, _md.BytesStorageMetadata):
        return None
    if not isinstance(item, _md.TensorStorageMetadata):
        return f"expected tensor or bytes metadata, got {type(item).__name__}"
    props, size, chunks = (getattr(item, f, None) for f in ("properties", "size", "chunks"))
    if not isinstance(props, _md.TensorProperties) or not isinstance(getattr(props, "dtype", None), torch.dtype):
        return "properties: expected TensorProperties with a torch dtype"
    if not _ints(size):
        return f"size: expected non-negative integers, got {size!r}"[:200]
    if not isinstance(chunks, list) or not all(
            isinstance(c, _md.ChunkStorageMetadata) and _ints(getattr(c, "offsets", None), len(size))
            and _ints(getattr(c, "sizes", None), len(size)) for c in chunks):
        return f"chunks: expected chunk metadata with {len(size)} offsets and sizes each"
    return None


class SafeMetadataReader(dcp.FileSystemReader):
    """`FileSystemReader` whose `read_metadata` goes through `load_metadata`."""

    def read_metadata(self, *args, **kwargs) -> _md.Metadata:
        md = load_metadata(Path(self.path) / METADATA_NAME)
        md.storage_meta.load_id = getattr(self, "load_id", None)
        return md


class ReproducibleWriter(dcp.FileSystemWriter):
    """No StorageMeta in `.metadata` (see the module docstring), so a rewrite is byte-identical."""

    def storage_meta(self):
        return None


def failure_text(err: BaseException) -> str:
    """One line for an error of dcp: a `CheckpointException` (a BaseException whose text is a whole
    traceback) is described by the first failure it wraps."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        err = inner[0] if isinstance(inner, tuple) and inner else inner
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
