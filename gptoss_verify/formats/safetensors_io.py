"""Safetensors on disk: header-only inspection, lazy tensor-by-tensor reads, planned sharded writes.

Reads: every shard's header is parsed and checked by us first (length, JSON, dtypes, offsets
against the file size), so a truncated or corrupt file fails with one line naming the file, not
deep inside a reader. Tensors are then read one at a time, each straight from its offset into a
tensor it owns (`readinto`). Not through safetensors' `safe_open`: its tensors are views of a
mapping of the whole shard, so one tensor kept alive (a peeked first item, a buffered q
projection) keeps every page touched since resident, and a 4 GB shard costs 4 GB of RSS.

Writes: a layout knows every name, shape and dtype it will write before the first tensor arrives
(from the config), so each shard's header is written first with fixed offsets and each incoming
tensor is written straight to its place. Nothing is buffered, the input order does not matter,
and a tensor that does not match the plan is refused by name. Output goes to an owned partial
directory beside the destination, renamed into place only when complete (`atomic_directory`,
fileio/partials.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import unique_keys
from .errors import CheckpointError
from .fileio.partials import open_output
from .tensor_ops import contiguous

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size "5GB"
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit

DTYPE_CODES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
    "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_CODE_OF: dict[torch.dtype, str] = {v: k for k, v in DTYPE_CODES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (BF16, U8, F32, ...): the file's spelling, not the
    package's (that is `gptoss_verify.dtypes.dtype_name`)."""
    try:
        return _CODE_OF[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies and what its header says (no data read)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = 0  # absolute position of the data in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# ---- reading -------------------------------------------------------------------------------------
def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one file's header: (tensors by name, `__metadata__`). No tensor data is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header (header length "
                                      f"{n} bytes, file {size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype = DTYPE_CODES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name}: {entry!r}") from None
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(f"{path}: tensor {name}: header offsets [{begin}, {end}) hold {end - begin} "
                                  f"bytes, expected {expected} for {entry['dtype']} {list(shape)}")
        if end > data_bytes:
            raise CheckpointError(f"{path}: truncated: tensor {name} ends at data byte {end}, "
                                  f"the file holds {data_bytes} data bytes")
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, shape, dtype, path, 8 + n + begin)
    check_spans(path, spans, data_bytes)
    return tensors, metadata


def check_spans(path: Path, spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The tensors' data must tile the data section exactly, as the safetensors format requires
    (its reader refuses a hole or trailing bytes with "invalid offset" / "incomplete metadata"):
    an overlap or a hole means the header and the data disagree, and transformers could not load
    the file."""
    at, last = 0, None
    for begin, end, name in sorted(spans):
        if begin < at and end > begin:
            raise CheckpointError(f"{path}: tensor {name}: data [{begin}, {end}) overlaps tensor {last}'s "
                                  f"(ends at {at})")
        if begin > at and end > begin:
            raise CheckpointError(f"{path}: tensor {name}: data starts at byte {begin}, expected {at} (a hole of "
                                  f"{begin - at} bytes {'after tensor ' + last if last else 'at the start'})")
        if end > begin:
            at, last = end, name
    if at != data_bytes:
        raise CheckpointError(f"{path}: {data_bytes - at} bytes after the last tensor's data (the header "
                              f"covers {at} of {data_bytes} data bytes)")


class SafetensorsDir:
    """The safetensors files of one directory seen as one checkpoint: an index if there is one,
    else every `*.safetensors` file. Headers are read up front; tensors lazily, one at a time."""

    def __init__(self, directory: str | Path, index_name: str = INDEX_NAME):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        self.index_path = self.directory / index_name
        self.tensors: dict[str, TensorInfo] = {}
        if self.index_path.exists():
            self._from_index()
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.directory}: no *.safetensors files")
            for file in files:
                found, _ = read_header(file)
                for name, info in found.items():
                    if name in self.tensors:
                        raise CheckpointError(f"{file}: tensor {name} is also in {self.tensors[name].file.name}")
                    self.tensors[name] = info

    def _from_index(self) -> None:
        try:
            index = json.loads(self.index_path.read_text(), object_pairs_hook=unique_keys)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise ValueError("weight_map is not an object")
            bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or "/" in v or v.startswith(".")), None)
            if bad is not None:
                raise ValueError(f"weight_map places tensor {bad} in {weight_map[bad]!r}, not a file name beside the index")
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{self.index_path}: corrupt index ({err!r})") from None
        headers: dict[str, dict[str, TensorInfo]] = {}
        for file_name in sorted(set(weight_map.values())):
            file = self.directory / file_name
            if not file.exists():
                first = next(n for n, f in weight_map.items() if f == file_name)
                raise CheckpointError(f"{self.index_path}: names file {file_name} (for tensor {first}), "
                                      f"which does not exist")
            headers[file_name], _ = read_header(file)
        for name, file_name in weight_map.items():
            if name not in headers[file_name]:
                raise CheckpointError(f"{self.directory / file_name}: tensor {name} is listed in the index "
                                      f"but missing from the file")
            self.tensors[name] = headers[file_name][name]
        for file_name, found in headers.items():
            for name in found:
                if weight_map.get(name) != file_name:
                    raise CheckpointError(f"{self.directory / file_name}: holds tensor {name}, which the "
                                          f"index does not place in this file")
        meta = index.get("metadata")
        total = meta.get("total_size") if isinstance(meta, dict) else None
        actual = sum(t.nbytes for t in self.tensors.values())
        if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total != actual):
            raise CheckpointError(f"{self.index_path}: metadata.total_size is {total!r}, the tensors hold {actual} bytes")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get_finite(self, name: str) -> torch.Tensor:
        """`get`, refusing NaN/Inf in a float tensor and NaN (255) in an MXFP4 E8M0 scale tensor."""
        t = self.get(name)
        check_finite(t, name, self.tensors[name].file)
        return t

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory of its own."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: missing tensor {name}") from None
        out = torch.empty(info.shape, dtype=info.dtype)
        if not out.numel():
            return out
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        try:
            with open(info.file, "rb") as f:
                f.seek(info.offset)
                got = f.readinto(view)
        except OSError as err:
            raise CheckpointError(f"{info.file}: cannot read tensor {name} ({err})") from None
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: truncated: tensor {name} has {got} of {info.nbytes} bytes")
        return out


# float dtype -> (same-size integer dtype, magnitude mask, bits of +Inf): |x| bits >= Inf's are NaN/Inf
_NONFINITE_BITS = {torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80), torch.float16: (torch.int16, 0x7FFF, 0x7C00),
                   torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000)}


def check_finite(t: torch.Tensor, name: str, file) -> None:
    """Refuse NaN/Inf in a float tensor (or slice of one) and NaN (255) in an MXFP4 E8M0 scale
    tensor, naming the file and tensor."""
    if t.is_floating_point():
        bad = count_nonfinite(t)
        if bad:
            raise CheckpointError(f"{file}: tensor {name}: expected finite values, got {bad} NaN/Inf")
    elif t.dtype == torch.uint8 and name.endswith(("_scales", ".scales")) and bool((t == 255).any()):
        raise CheckpointError(f"{file}: tensor {name}: expected E8M0 scales < 255, got 255 (NaN)")


def count_nonfinite(t: torch.Tensor, chunk: int = 1 << 24) -> int:
    """NaN/Inf elements of a float tensor, in chunks: `isfinite` of a whole 20B embedding would
    allocate several times the tensor in temporaries. The common case (none) is decided on the
    integer bit patterns, a masked max, several times faster than `isfinite` on bf16."""
    if not t.is_contiguous() and t.dim() >= 2 and t.transpose(-1, -2).is_contiguous():
        t = t.transpose(-1, -2)  # the same elements; reshape(-1) of the view would copy them all
    flat = t.reshape(-1)
    bad = 0
    bits = _NONFINITE_BITS.get(flat.dtype)
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk]
        if bits is not None and part.is_contiguous():
            int_dtype, mask, inf = bits
            if int((part.view(int_dtype) & mask).amax()) < inf:
                continue
        if not bool(torch.isfinite(part).all()):
            bad += int((~torch.isfinite(part)).sum())
    return bad


# ---- writing -------------------------------------------------------------------------------------
Entry = tuple[str, tuple[int, ...], torch.dtype]


def plan_shards(entries: Sequence[Entry], max_bytes: int, naming: Callable[[int, int], str]
                ) -> list[tuple[str, list[Entry]]]:
    """Greedy split of entries (in order) into files of at most `max_bytes` (one tensor may exceed it
    alone). `naming(i, n)` names file i of n."""
    groups: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    return [(naming(i, len(groups)), g) for i, g in enumerate(groups)]


def hf_shard_name(i: int, n: int) -> str:
    """transformers' names; the published gpt-oss checkpoints count 'of' from 0
    (model-00000-of-00002 ... model-00002-of-00002 for three files), and so do we."""
    return "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n - 1:05d}.safetensors"


class PlannedWriter:
    """Shard files whose headers are fixed before any data: `put` each planned tensor once, in any
    order, then `finish`. Refuses an unplanned name, a second copy, a wrong shape or dtype."""

    def __init__(self, directory: Path, plan: list[tuple[str, list[Entry]]], metadata: dict[str, str] | None = None,
                 write_index: bool | None = None):
        self.directory = Path(directory)
        self.plan = plan
        self.slots: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}  # name -> (file, pos, shape, dtype)
        self.files = []
        self.written: set[str] = set()
        self.write_index = len(plan) > 1 if write_index is None else write_index
        meta = {"format": "pt", **(metadata or {})}
        for file_no, (file_name, entries) in enumerate(plan):
            header: dict = {"__metadata__": meta}
            offsets = []
            offset = 0
            for name, shape, dtype in entries:
                if name in self.slots or name in header:
                    raise CheckpointError(f"{self.directory}: tensor {name} planned twice")
                nbytes = math.prod(shape) * dtype.itemsize
                header[name] = {"dtype": dtype_code(dtype), "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offsets.append(offset)
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            for (name, shape, dtype), rel in zip(entries, offsets):
                self.slots[name] = (file_no, start + rel, tuple(shape), dtype)
            f = open_output(self.directory / file_name, "wb")
            self.files.append(f)
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(start + offset)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        try:
            file_no, pos, shape, dtype = self.slots[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: unexpected tensor {name} (not in this layout)") from None
        if name in self.written:
            raise CheckpointError(f"{self.directory}: tensor {name} given twice")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CheckpointError(f"{self.directory}: tensor {name}: expected {dtype_code(dtype)} {list(shape)}, "
                                  f"got {tensor.dtype} {list(tensor.shape)}")
        f = self.files[file_no]
        if tensor.numel():
            data = contiguous(tensor.detach().to("cpu")).reshape(-1).view(torch.uint8)
            f.seek(pos)
            f.write(memoryview(data.numpy()))
        self.written.add(name)

    def missing(self) -> list[str]:
        return [n for n in self.slots if n not in self.written]

    def finish(self) -> None:
        missing = self.missing()
        self.close()
        if missing:
            raise CheckpointError(f"{self.directory}: the input stream lacks {len(missing)} tensor(s), "
                                  f"first {missing[0]}")
        if self.write_index:
            total = sum(math.prod(s) * d.itemsize for _, entries in self.plan for _, s, d in entries)
            weight_map = {name: file_name for file_name, entries in self.plan for name, _, _ in entries}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.directory / INDEX_NAME, index)

    def close(self) -> None:
        for f in self.files:
            f.close()


def write_json(path: Path, data) -> None:
    """A JSON file inside a partial output (its write errors name the file)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """A text file inside a partial output (its write errors name the file)."""
    with open_output(path, "w") as f:
        f.write(text)
