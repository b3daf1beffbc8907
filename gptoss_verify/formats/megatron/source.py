"""Random access to the canonical tensors a Megatron writer slices from, at bounded memory.

A rank's file needs a slice of many canonical tensors (its query groups, its experts, its rows of
the vocabulary), and every rank needs a different slice, so a writer reads the source many times
and in its own order. `open_source` turns what `write` was given into a `Source` with
`rows(name, start, stop)` (a slice along the first axis) and `full(name)`:

- a `Mapping` name -> tensor (an in-memory dict, or a lazy mapping that loads on `__getitem__`)
  is used directly;
- a one-shot stream of (name, tensor) is spooled to a file on disk as it arrives and read back
  slice by slice with `pread`, so memory holds one slice, never the model. MXFP4 expert pairs
  (`*_blocks`/`*_scales`) are spooled as they are (4x smaller) and only the experts asked for
  are decoded (exactly) to the dense HF layout.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ...schema import is_expert_weight
from .. import mxfp4
from ..errors import CheckpointError
from ..fileio.partials import open_output
from ..fileio.readahead import ReadAhead
from ..tensor_ops import contiguous, transpose_copy


class Source:
    dtype: torch.dtype  # the float dtype of the output (that of the source's float tensors)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def full(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.shape(name)[0])

    def expert_t(self, name: str, e: int, order: torch.Tensor | None = None) -> torch.Tensor:
        """Expert e of a dense expert weight, transposed to [out, in] (contiguous): what Megatron
        stores; its rows taken in `order` if given (Megatron's [gate; up] from HF's interleaved
        rows). MXFP4 sources reorder the (4x smaller) blocks and decode straight into it."""
        t = transpose_copy(self.rows(name, e, e + 1)[0])
        return t if order is None else t[order]

    def shape(self, name: str) -> tuple[int, ...]:  # pragma: no cover - interface
        raise NotImplementedError

    def prefetch(self, names: Iterable[str]) -> None:
        """A hint that these canonical tensors come next; a source on disk starts reading them."""

    def close(self) -> None:
        pass


class MappingSource(Source):
    def __init__(self, mapping: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None):
        self.mapping = mapping
        self._dense: dict[str, torch.Tensor] = {}
        if dtype is None:
            first = next((n for n in mapping if not n.endswith(("_blocks", "_scales"))), None)
            dtype = mapping[first].dtype if first is not None and mapping[first].is_floating_point() else torch.bfloat16
        self.dtype = dtype

    def _get(self, name: str) -> torch.Tensor:
        if name in self.mapping:
            return self.mapping[name]
        if is_expert_weight(name) and name + "_blocks" in self.mapping:
            return _Lazy(self.mapping[name + "_blocks"], self.mapping[name + "_scales"], name, self.dtype)
        raise CheckpointError(f"source: missing tensor {name}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self._get(name)
        out = t.rows(start, stop) if isinstance(t, _Lazy) else t[start:stop]
        return out.to(self.dtype) if out.is_floating_point() and out.dtype != self.dtype else out

    def expert_t(self, name: str, e: int, order: torch.Tensor | None = None) -> torch.Tensor:
        t = self._get(name)
        return t.expert_t(e, order) if isinstance(t, _Lazy) else super().expert_t(name, e, order)


class _Lazy:
    """Dense view of MXFP4 expert pairs, decoded expert by expert when sliced."""

    def __init__(self, blocks, scales, name, dtype):
        self.blocks, self.scales, self.name, self.dtype = blocks, scales, name, dtype
        e, out, groups, _ = blocks.shape
        self.shape = (e, groups * mxfp4.BLOCK, out)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        try:
            return mxfp4.to_hf_dense(self.blocks[start:stop], self.scales[start:stop], self.dtype)
        except mxfp4.MXFP4Error as err:
            raise CheckpointError(f"source: {self.name}: {err}") from None

    def expert_t(self, e: int, order: torch.Tensor | None = None) -> torch.Tensor:
        return _decode_rows(self.blocks[e], self.scales[e], order, self.dtype, self.name)


class SpoolSource(Source):
    """Every tensor of a stream, written once to a scratch file; slices read back with pread."""

    def __init__(self, stream: Iterable[tuple[str, torch.Tensor]], scratch_dir: Path, progress=None):
        self.dir = Path(tempfile.mkdtemp(prefix=".megatron-spool-", dir=scratch_dir))
        self.path = self.dir / "spool.bin"
        self.index: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self.dtype = None
        offset = 0
        try:
            with open_output(self.path, "wb") as f:
                for name, tensor in stream:
                    if name in self.index:
                        raise CheckpointError(f"source: tensor {name} appears twice")
                    t = contiguous(tensor.detach().to("cpu"))
                    if self.dtype is None and t.is_floating_point():
                        self.dtype = t.dtype
                    data = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
                    f.write(memoryview(data.numpy()))
                    self.index[name] = (offset, tuple(t.shape), t.dtype)
                    offset += data.numel()
                    if progress is not None:
                        progress.update()
            self._fd = os.open(self.path, os.O_RDONLY)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.dtype = self.dtype or torch.bfloat16

    def _read(self, name: str, start: int, stop: int) -> torch.Tensor:
        offset, shape, dtype = self.index[name]
        row = dtype.itemsize
        for s in shape[1:]:
            row *= s
        n = (stop - start) * row
        buf = torch.empty(n, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        got = 0
        while got < n:
            k = os.preadv(self._fd, [view[got:]], offset + start * row + got)
            if k <= 0:
                raise CheckpointError(f"{self.path}: spool truncated while reading {name}")
            got += k
        return buf.view(dtype).reshape(stop - start, *shape[1:])

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.index:
            return self.index[name][1]
        if is_expert_weight(name) and name + "_blocks" in self.index:
            e, out, groups, _ = self.index[name + "_blocks"][1]
            return (e, groups * mxfp4.BLOCK, out)
        raise CheckpointError(f"source: missing tensor {name}")

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self.index:
            t = self._read(name, start, stop)
            return t.to(self.dtype) if t.is_floating_point() and t.dtype != self.dtype else t
        if is_expert_weight(name) and name + "_blocks" in self.index:
            if name + "_scales" not in self.index:
                raise CheckpointError(f"source: {name}_blocks came without {name}_scales")
            try:
                return mxfp4.to_hf_dense(self._read(name + "_blocks", start, stop),
                                         self._read(name + "_scales", start, stop), self.dtype)
            except mxfp4.MXFP4Error as err:
                raise CheckpointError(f"source: {name}: {err}") from None
        raise CheckpointError(f"source: missing tensor {name}")

    def expert_t(self, name: str, e: int, order: torch.Tensor | None = None) -> torch.Tensor:
        if name not in self.index and is_expert_weight(name) and name + "_blocks" in self.index:
            if name + "_scales" not in self.index:
                raise CheckpointError(f"source: {name}_blocks came without {name}_scales")
            return _decode_rows(self._read(name + "_blocks", e, e + 1)[0], self._read(name + "_scales", e, e + 1)[0],
                                order, self.dtype, name)
        return super().expert_t(name, e, order)

    def names(self) -> list[str]:
        return list(self.index)

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class SafetensorsSource(SpoolSource):
    """An HF checkpoint sliced in place: rows read with pread straight from its safetensors files,
    so HF -> Megatron neither spools the checkpoint to scratch nor holds a whole tensor it only
    needs a slice of. Every slice is checked by `safetensors_io.check_finite` (NaN/Inf,
    E8M0 scale 255), naming the file and tensor. `files` is a validated `SafetensorsDir`."""

    def __init__(self, files):  # noqa: super().__init__ spools; here the files are the spool
        self.files = files
        self.infos = files.tensors
        self.index = {name: (info.offset, info.shape, info.dtype) for name, info in self.infos.items()}
        embed = self.infos.get("model.embed_tokens.weight")
        self.dtype = embed.dtype if embed is not None else torch.bfloat16
        self._fds: dict[Path, int] = {}
        self._ahead = ReadAhead()

    def prefetch(self, names: Iterable[str]) -> None:
        """Read these tensors' bytes (MXFP4 pairs included) into the page cache in the background
        while the writer is busy with the tensors before them: the writer's own reads are small
        slices in its order, which a disk busy writing serves slowly."""
        self._ahead.warm((info.file, info.offset, info.nbytes) for name in names
                         for stored in (name, name + "_blocks", name + "_scales")
                         if (info := self.infos.get(stored)) is not None)

    def _read(self, name: str, start: int, stop: int) -> torch.Tensor:
        from ..safetensors_io import check_finite
        info = self.infos[name]
        row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        n = (stop - start) * row
        buf = torch.empty(n, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], info.offset + start * row + got)
            if k <= 0:
                raise CheckpointError(f"{info.file}: truncated: tensor {name}")
            got += k
        t = buf.view(info.dtype).reshape(stop - start, *info.shape[1:])
        check_finite(t, name, info.file)
        return t

    def close(self) -> None:
        self._ahead.close()
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


def _decode_rows(blocks: torch.Tensor, scales: torch.Tensor, order: torch.Tensor | None, dtype: torch.dtype,
                 name: str) -> torch.Tensor:
    """One expert's [out, in] from its blocks/scales, rows in `order` if given."""
    if order is not None:
        blocks, scales = blocks[order], scales[order]
    try:
        return mxfp4.decode(blocks, scales, dtype)
    except mxfp4.MXFP4Error as err:
        raise CheckpointError(f"source: {name}: {err}") from None


def open_source(source, scratch_dir: Path, progress=None) -> Source:
    if isinstance(source, Source):
        return source
    if isinstance(source, Mapping):
        return MappingSource(source)
    return SpoolSource(source, scratch_dir, progress)
