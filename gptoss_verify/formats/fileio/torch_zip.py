"""A streaming writer of the zip container that `torch.save` writes, record for record.

Why our own: torch's `PyTorchFileWriter` computes its CRC32 with miniz's table-driven loop, about
0.3 GB/s on the 2-core benchmark machine, which made it the largest single cost of writing Megatron
rank files. `zlib.crc32` runs about 1.3 GB/s there and releases the GIL, so here the CRC of each
chunk runs in a worker thread while the same chunk goes to the file.

The bytes are those torch (caffe2/serialize/inline_container.cc over its miniz) writes, so that
every reader that takes a `torch.save` file takes ours, `torch.load(mmap=True)` included:
- records under `<archive>/` (the file name up to its last dot, as torch names it), stored (method
  0), time and date 0, UTF-8 flag; sizes and CRC go in a data descriptor after the data (flag bit 3;
  an empty record has neither the bit nor a descriptor);
- every record's data starts at a multiple of 64: the local header's extra field ends with a `FB`
  field of `Z` padding, after a ZIP64 field when the record or its offset reaches 4 GiB (miniz's
  rule: size >= 0xFFFFFFFF gives uncompressed size and a 0 compressed size in the local field and
  64-bit sizes in the descriptor; offset >= 0xFFFFFFFF gives the offset);
- record order: `data.pkl`, `.format_version`, `.storage_alignment`, `byteorder`, the data records,
  then `version` and `.data/serialization_id` at close; the central directory follows, then always
  a ZIP64 end record and locator, then the classic end record with saturated fields.

The one difference: the first 20 digits of `.data/serialization_id` hash the record names in write
order (torch hashes them in `std::unordered_set` order, which is not reproducible); the last 20, the
combined CRCs, are torch's. Nothing reads the id but logging.
"""
from __future__ import annotations

import hashlib
import os
import struct
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .partials import open_output

ALIGNMENT = 64
#: Sizes and offsets at or above this use ZIP64 fields (miniz's MZ_UINT32_MAX test); tests lower it.
ZIP64_LIMIT = 0xFFFFFFFF
#: Bytes per write/CRC step: small enough to stay in cache between the two, large enough that the
#: per-call overhead is noise.
CHUNK = 8 << 20
VERSION_RECORD = b"3\n"
#: Chunks at least this large get their CRC computed in the worker thread.
_THREAD_MIN = 1 << 16

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_DESC32 = struct.Struct("<IIII")
_DESC64 = struct.Struct("<IIQQ")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR = struct.Struct("<IIQI")
_EOCD = struct.Struct("<IHHHHIIH")
_DESCRIPTOR_SIG = 0x08074B50
_MASK64 = (1 << 64) - 1


def hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t: how torch folds the records' CRCs into the id."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _MASK64)) & _MASK64


def archive_name(path: str | Path) -> str:
    """The folder torch puts the records in: the file's name up to its last dot."""
    name = Path(path).name
    dot = name.rfind(".")
    stem = name[:dot] if dot >= 0 else name
    if not stem:
        raise ValueError(f"{path}: torch cannot name an archive after this file name")
    return stem


class TorchZipWriter:
    """`TorchZipWriter(path)`; `write_record(name, data)` with any bytes-like `data` (written in
    chunks, never copied whole); `close()` adds `version`, the serialization id and the central
    directory and renames `<path>.partial` to `path`; `abort()` removes the partial file.

    The records torch writes first (`data.pkl` etc.) are the caller's to write, in torch's order;
    `write_preamble` does that for a `torch.save` file.
    """

    def __init__(self, path: str | Path, archive: str | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.prefix = (archive if archive is not None else archive_name(self.path)) + "/"
        self._f = open_output(self.partial, "wb", buffering=0)
        self.pos = 0
        self._central: list[bytes] = []
        self._names: list[str] = []
        self._crc_combined = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="crc32")

    # ---- records ------------------------------------------------------------------------------
    def write_preamble(self, pickle_bytes: bytes) -> None:
        """The records `torch.save` writes before the storages, in its order."""
        self.write_record("data.pkl", pickle_bytes)
        self.write_record(".format_version", b"1")
        self.write_record(".storage_alignment", str(ALIGNMENT).encode())
        self.write_record("byteorder", sys.byteorder.encode())

    def write_record(self, name: str, data, crc=None) -> None:
        """`crc`: the data's CRC32 if the caller has it (an int, or a Future of one that is waited
        for after the data is written); computed alongside the write otherwise."""
        if name in self._names:
            raise ValueError(f"record {name} written twice")
        view = memoryview(data).cast("B")
        size = view.nbytes
        offset = self.pos
        full = (self.prefix + name).encode("utf-8")
        big_size, big_ofs = size >= ZIP64_LIMIT, offset >= ZIP64_LIMIT
        local64 = _zip64_field(([size, 0] if big_size else []) + ([offset] if big_ofs else []))
        start = offset + _LOCAL.size + len(full) + len(local64) + 4
        pad = -start % ALIGNMENT
        extra = local64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        flags = 0x0808 if size else 0x0800
        self._write(_LOCAL.pack(0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(full), len(extra)) + full + extra)
        if crc is None:
            crc = self._write_data(view)
        else:
            self._write(view)
            crc = crc.result() if hasattr(crc, "result") else crc
        if size:
            # torch's writer folds every write that starts like a data descriptor into the id
            if size >= 8 and int.from_bytes(view[:4], "little") == _DESCRIPTOR_SIG:
                self._crc_combined = hash_combine(self._crc_combined, int.from_bytes(view[4:8], "little"))
            desc = (_DESC64.pack(_DESCRIPTOR_SIG, crc, size, size) if local64
                    else _DESC32.pack(_DESCRIPTOR_SIG, crc, size, size))
            self._crc_combined = hash_combine(self._crc_combined, crc)
            self._write(desc)
        central64 = _zip64_field(([size, size] if big_size else []) + ([offset] if big_ofs else []))
        size32 = 0xFFFFFFFF if big_size else size
        self._central.append(_CENTRAL.pack(
            0x02014B50, 0, 0, flags, 0, 0, 0, crc, size32, size32, len(full), len(central64), 0, 0, 0, 0,
            0xFFFFFFFF if big_ofs else offset) + full + central64)
        self._names.append(name)

    def close(self) -> None:
        """Trailing records, central directory, end records; then the rename."""
        if "version" not in self._names and ".data/version" not in self._names:
            self.write_record("version", VERSION_RECORD)
        if "byteorder" not in self._names:
            self.write_record("byteorder", sys.byteorder.encode())
        names_hash = 0
        for name in self._names:
            names_hash = hash_combine(names_hash, int.from_bytes(
                hashlib.blake2b(name.encode(), digest_size=8).digest(), "little"))
        self.write_record(".data/serialization_id", f"{names_hash:020d}{self._crc_combined:020d}".encode())
        cd_offset = self.pos
        cd = b"".join(self._central)
        self._write(cd)
        n = len(self._central)
        eocd64_offset = self.pos
        self._write(_EOCD64.pack(0x06064B50, 44, 0x031E, 0x002D, 0, 0, n, n, len(cd), cd_offset)
                    + _LOCATOR.pack(0x07064B50, 0, eocd64_offset, 1)
                    + _EOCD.pack(0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), _cap(len(cd)), _cap(cd_offset), 0))
        self._pool.shutdown()
        self._f.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        """Drop the partial file (after an error); the target name is never touched."""
        self._pool.shutdown()
        self._f.close()
        self.partial.unlink(missing_ok=True)

    # ---- bytes --------------------------------------------------------------------------------
    def _write(self, data) -> None:
        view = memoryview(data)
        while view.nbytes:
            n = self._f.write(view)
            view = view[n:]
            self.pos += n

    def _write_data(self, view: memoryview) -> int:
        """Writes `view` chunk by chunk; the CRC of each chunk runs in the worker meanwhile
        (zlib releases the GIL, as does the file write), so the two costs overlap."""
        crc = 0
        for i in range(0, view.nbytes, CHUNK):
            chunk = view[i:i + CHUNK]
            fut = self._pool.submit(zlib.crc32, chunk, crc) if chunk.nbytes >= _THREAD_MIN else None
            if fut is None:
                crc = zlib.crc32(chunk, crc)
            self._write(chunk)
            if fut is not None:
                crc = fut.result()
        return crc


def _zip64_field(values: list[int]) -> bytes:
    if not values:
        return b""
    return struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values)


def _cap(value: int) -> int:
    return 0xFFFFFFFF if value >= ZIP64_LIMIT else value


def tensor_bytes(tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor's storage span, as a zero-copy memoryview (bf16
    included: viewed as uint8 first, since numpy has no bfloat16)."""
    import torch
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
