"""`torch.save` files written one tensor at a time, and indexed without reading their tensors.

`torch.save` needs every tensor in memory at once; a Megatron rank file of a full-width model is
several GB. `StreamingTorchFile` writes the same zip container (`data.pkl`, `data/<key>` records,
64-byte aligned) through `torch_zip.TorchZipWriter` (torch's own `PyTorchFileWriter` computes its
CRC32 at about 0.3 GB/s, the largest cost of a Megatron export): the pickle is written first with
placeholders for the storages, then each tensor's bytes as it is produced, straight from the
tensor's memory, so at most one tensor is held. The result loads with
`torch.load(..., weights_only=True)` (and `mmap=True`).
"""
from __future__ import annotations

import argparse
import collections
import io
import pickle
import zipfile
import zlib
from pathlib import Path

import torch

from ...dtypes import dtype_name
from ..errors import CheckpointError
from .torch_zip import TorchZipWriter, tensor_bytes

_STORAGE_TYPES = {
    torch.float64: "DoubleStorage", torch.float32: "FloatStorage", torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage", torch.uint8: "ByteStorage", torch.int8: "CharStorage",
    torch.int16: "ShortStorage", torch.int32: "IntStorage", torch.int64: "LongStorage",
    torch.bool: "BoolStorage",
}


class _StorageRef:
    """Stands in the pickle for a storage whose bytes are written later."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly as a contiguous CPU tensor does (`_rebuild_tensor_v2`)."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype: torch.dtype):
        # a fresh tuple per tensor: pickle memoizes an object it meets twice, so a shape tuple shared
        # by two entries would change the bytes of data.pkl (torch.save pickles each tensor's own)
        self.key, self.shape, self.dtype = key, tuple(int(n) for n in shape), dtype

    def __reduce_ex__(self, protocol):
        numel = 1
        for s in self.shape:
            numel *= s
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (_StorageRef(self.key, self.dtype, numel), 0, self.shape, tuple(reversed(stride)), False,
                 collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, _STORAGE_TYPES[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


class StreamingTorchFile:
    """`StreamingTorchFile(path, skeleton, entries)`: `skeleton(refs)` builds the object to pickle
    from {name: placeholder}; then `put(name, tensor)` for every entry, `close()` (or `abort()`).
    Records are written in `put` order; putting in `entries` order gives torch.save's order."""

    def __init__(self, path: str | Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], skeleton):
        self.path = Path(path)
        self.expected = {name: (tuple(shape), dtype) for name, shape, dtype in entries}
        for name, (_, dtype) in self.expected.items():
            if dtype not in _STORAGE_TYPES:
                raise CheckpointError(f"{self.path}: tensor {name}: dtype {dtype} is not supported")
        self.keys = {name: str(i) for i, name in enumerate(self.expected)}
        refs = collections.OrderedDict((n, _TensorRef(self.keys[n], s, d)) for n, (s, d) in self.expected.items())
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(skeleton(refs))
        self._writer = TorchZipWriter(self.path)
        self._writer.write_preamble(buf.getvalue())
        self.done: set[str] = set()

    def put(self, name: str, tensor: torch.Tensor, crc=None) -> None:
        """`crc`: the CRC32 of the tensor's bytes (an int or a Future of one) when the caller has
        it already, as for a tensor written to several files; computed here otherwise."""
        if name not in self.expected:
            raise CheckpointError(f"{self.path}: unexpected tensor {name}")
        if name in self.done:
            raise CheckpointError(f"{self.path}: tensor {name} written twice")
        shape, dtype = self.expected[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CheckpointError(f"{self.path}: tensor {name}: expected {dtype} {list(shape)}, "
                                  f"got {tensor.dtype} {list(tensor.shape)}")
        # only the tensor's own span is written, so a view into a larger storage needs no copy
        t = tensor.detach().to("cpu").contiguous()
        self._writer.write_record(f"data/{self.keys[name]}", tensor_bytes(t), crc=crc)
        self.done.add(name)

    def close(self) -> None:
        missing = [n for n in self.expected if n not in self.done]
        if missing:
            self.abort()
            raise CheckpointError(f"{self.path}: tensor {missing[0]} was never written "
                                  f"({len(missing)} missing)")
        self._writer.close()

    def abort(self) -> None:
        """Remove the partial file (the finished name is only created by `close`)."""
        self._writer.abort()


class StoredTensor:
    """One tensor of a torch.save file, located but not read: `load()` reads just its bytes and
    checks them against the CRC-32 the zip directory holds for their record (torch's own reader
    never does, so a flipped byte would otherwise be read as data)."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                 dtype: torch.dtype, nbytes: int, record: tuple[str, int, int, int] | None = None):
        self.path, self.offset, self.shape, self.stride, self.dtype, self.nbytes = path, offset, shape, stride, dtype, nbytes
        self.record = record  # (name, offset, size, CRC-32) of the record holding the bytes

    def _check_crc(self, read: memoryview) -> None:
        """`read` (this tensor's bytes) or, for a view into a larger record, the whole record
        re-read in pieces, hashes to the record's CRC-32."""
        if self.record is None:
            return
        name, offset, size, want = self.record
        if offset == self.offset and size == self.nbytes:
            got = zlib.crc32(read)
        else:
            got, chunk = 0, bytearray(1 << 24)
            with open(self.path, "rb") as f:
                f.seek(offset)
                for start in range(0, size, len(chunk)):
                    n = f.readinto(memoryview(chunk)[:min(len(chunk), size - start)])
                    got = zlib.crc32(memoryview(chunk)[:n], got)
        if got != want:
            raise CheckpointError(f"{self.path}: record {name}: CRC-32 {got:08x}, the zip directory says "
                                  f"{want:08x} (the tensor's bytes were changed)")

    def load(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor's values; read straight into `out` (contiguous, this shape and dtype) if given."""
        if out is not None:
            if tuple(out.shape) != tuple(self.shape) or out.dtype != self.dtype:
                raise ValueError(f"{self.path}: cannot read {self.dtype} {list(self.shape)} into {out.dtype} {list(out.shape)}")
            if not out.is_contiguous() or not _contiguous(self.shape, self.stride) \
                    or out.numel() * out.element_size() != self.nbytes or not out.numel():
                return out.copy_(self.load())  # a strided record (a saved view) or destination
            buf = out.reshape(-1).view(torch.uint8)
        else:
            buf = torch.empty(self.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            got = f.readinto(view)
        if got != self.nbytes:
            raise CheckpointError(f"{self.path}: truncated (a tensor's data ends past the end of the file)")
        self._check_crc(view)
        if out is not None:
            return out
        flat = buf.view(self.dtype)
        numel = 1
        for s in self.shape:
            numel *= s
        if numel == flat.numel() and _contiguous(self.shape, self.stride):
            return flat.reshape(self.shape)
        return flat.as_strided(self.shape, self.stride).clone()

    def same_bytes_as(self, a: torch.Tensor, chunk: int = 1 << 26) -> bool:
        """`a` equals this tensor, byte for byte, read from disk in 64 MB pieces: a replicated copy
        (the vocabulary shard of every expert-parallel rank) is never held whole beside the first."""
        if tuple(a.shape) != tuple(self.shape) or a.dtype != self.dtype:
            return False
        if not _contiguous(self.shape, self.stride) or self.nbytes != a.numel() * a.element_size():
            return same_bytes(_flat_bytes(a), _flat_bytes(self.load()))
        mine = _flat_bytes(a)
        buf = torch.empty(min(chunk, self.nbytes), dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for start in range(0, self.nbytes, chunk):
                n = min(chunk, self.nbytes - start)
                if f.readinto(memoryview(buf.numpy())[:n]) != n:
                    raise CheckpointError(f"{self.path}: truncated (a tensor's data ends past the end of the file)")
                if not same_bytes(buf[:n], mine[start:start + n]):
                    return False
        return True


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two flat uint8 tensors hold the same bytes; compared 8 bytes at a time where both allow it
    (torch.equal on uint8 runs about 1.7 GB/s on the benchmark machine, on int64 about 12)."""
    if a.numel() != b.numel():
        return False
    if a.numel() % 8 == 0 and a.data_ptr() % 8 == 0 and b.data_ptr() % 8 == 0:
        return torch.equal(a.view(torch.int64), b.view(torch.int64))
    return torch.equal(a, b)


def _contiguous(shape, stride) -> bool:
    acc = 1
    for s, st in zip(reversed(shape), reversed(stride)):
        if s != 1 and st != acc:
            return False
        acc *= s
    return True


def index(path: str | Path) -> object:
    """The unpickled object of a torch.save file with every tensor replaced by a `StoredTensor`
    (weights_only rules; argparse.Namespace allowed), reading only the pickle: no tensor data is
    touched, so opening a multi-GB rank file costs a few milliseconds."""
    from torch import _weights_only_unpickler as wu
    path = Path(path)
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        pkl = reader.get_record("data.pkl")
    except (RuntimeError, OSError) as err:
        raise CheckpointError(f"{path}: not a torch.save zip file ({str(err).splitlines()[0] if str(err) else err!r})") from None
    keys: dict[int, tuple[str, torch.dtype, int]] = {}
    storages = []

    def persistent_load(saved_id):
        _, storage_type, key, _location, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        nbytes = numel * torch._utils._element_size(dtype)
        untyped = torch.UntypedStorage(nbytes, device="meta")
        storages.append(untyped)
        keys[untyped._cdata] = (str(key), dtype, nbytes)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            up = wu.Unpickler(io.BytesIO(pkl), encoding="utf-8")
            up.persistent_load = persistent_load
            obj = up.load()
    except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, EOFError) as err:
        raise CheckpointError(f"{path}: holds objects that weights_only loading refuses "
                              f"({_first_line(err) or repr(err)})") from None
    except Exception as err:  # noqa: BLE001 - corrupt opcodes raise more (IndexError of an empty stack, KeyError of a memo)
        raise CheckpointError(f"{path}: data.pkl does not unpickle ({type(err).__name__}: {_first_line(err)})") from None
    size = path.stat().st_size
    crcs = _record_crcs(path)

    def locate(t: torch.Tensor) -> StoredTensor:
        try:  # a tensor the pickle built itself (on the meta device, sparse, nested) has no record
            found = keys.get(t.untyped_storage()._cdata) if t.layout == torch.strided and not t.is_quantized else None
        except (RuntimeError, NotImplementedError):
            found = None
        if found is None:
            raise CheckpointError(f"{path}: a tensor not stored in a record of the file ({t.layout}, {t.device} "
                                  f"{dtype_name(t.dtype)} {list(t.shape)}), expected tensors of data/ records")
        key, dtype, nbytes = found
        try:
            base = reader.get_record_offset(f"data/{key}")
        except RuntimeError:
            raise CheckpointError(f"{path}: record data/{key} is missing") from None
        record = f"data/{key}"
        _check_extent(path, record, t, nbytes)
        start = base + t.storage_offset() * t.element_size()
        span = nbytes - t.storage_offset() * t.element_size()
        if base + nbytes > size:
            raise CheckpointError(f"{path}: truncated (record {record} ends past the end of the file)")
        if record not in crcs:
            raise CheckpointError(f"{path}: record {record} is not in the zip directory")
        return StoredTensor(path, start, tuple(t.shape), tuple(t.stride()), t.dtype, span,
                            (record, base, nbytes, crcs[record]))

    return _replace(obj, locate)


def _first_line(err: Exception) -> str:
    """An exception's message as one line (an error names one thing on one line)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _check_extent(path: Path, record: str, t: torch.Tensor, nbytes: int) -> None:
    """The view a pickle builds (storage offset, shape, stride) lies inside its record's bytes.
    Unpickled on the meta device nothing checks it, and `as_strided` on the bytes read would fail
    with a RuntimeError (a stride of 65 for 64 columns, an offset past the record's end)."""
    shape, stride, offset = tuple(t.shape), tuple(t.stride()), t.storage_offset()
    if offset < 0 or any(s < 0 for s in stride):
        raise CheckpointError(f"{path}: record {record}: a tensor with storage offset {offset} and stride "
                              f"{list(stride)}, expected no negative ones")
    end = offset if 0 in shape else offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    if end * t.element_size() > nbytes:
        raise CheckpointError(f"{path}: record {record}: a {dtype_name(t.dtype)} tensor {list(shape)} with stride "
                              f"{list(stride)} at storage offset {offset} reaches byte {end * t.element_size()}, "
                              f"past the record's {nbytes} bytes")


def _record_crcs(path: Path) -> dict[str, int]:
    """Each record's CRC-32 from the zip directory, by its name inside the archive folder."""
    try:
        with zipfile.ZipFile(path) as z:
            return {info.filename.split("/", 1)[-1]: info.CRC for info in z.infolist()}
    except Exception as err:  # noqa: BLE001 - a damaged directory raises many types (BadZipFile, NotImplementedError, ...)
        raise CheckpointError(f"{path}: its zip directory does not read ({type(err).__name__}: {err})") from None


def _replace(obj, locate):
    if isinstance(obj, torch.Tensor):
        return locate(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _replace(v, locate)) for k, v in obj.items()) if isinstance(obj, collections.OrderedDict) \
            else {k: _replace(v, locate) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace(v, locate) for v in obj)
    return obj
