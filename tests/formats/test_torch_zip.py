"""Our torch.save container writer (`formats/fileio/torch_zip.py`, used by the Megatron rank files):
the bytes torch.save writes, loadable by torch.load (mmap too), valid zip (CRCs), 64-byte aligned
data, ZIP64 past 4 GiB (threshold lowered here; the real size is a slow opt-in test)."""
from __future__ import annotations

import collections
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from gptoss_verify.formats.fileio import torch_zip
from gptoss_verify.formats.fileio.torch_save_file import StreamingTorchFile
from gptoss_verify.formats.fileio.torch_zip import TorchZipWriter, tensor_bytes


def _tensors() -> collections.OrderedDict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return collections.OrderedDict([
        ("bf16", torch.randn(7, 33, generator=g).to(torch.bfloat16)),
        ("f32", torch.randn(129, generator=g)),
        ("u8", torch.randint(0, 256, (300,), dtype=torch.uint8, generator=g)),
        ("i64", torch.randint(-2**62, 2**62, (5, 3), dtype=torch.int64, generator=g)),
        ("scalar", torch.tensor(2.5, dtype=torch.float32)),
        ("empty", torch.empty(0, 4, dtype=torch.bfloat16)),
        ("view_t", base.t()),                 # non-contiguous
        ("view_step", base[:, ::3]),          # non-contiguous
        ("view_offset", base[2:4]),           # contiguous, offset into a larger storage
        ("bool", torch.tensor([True, False, True])),
        # starts like a zip data descriptor: torch folds such writes into its serialization id
        ("pk", torch.tensor(list(b"PK\x07\x08abcdefgh"), dtype=torch.uint8)),
    ])


def _obj(model):
    return {"model": model, "checkpoint_version": 3.0, "iteration": 0}


def _write_ours(path: Path, tensors) -> None:
    f = StreamingTorchFile(path, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], _obj)
    for k, v in tensors.items():
        f.put(k, v)
    f.close()


def _records(path: Path) -> list[tuple[str, int, int, int]]:
    """(name, data offset, size, crc) per record, in file order, read from the local headers."""
    out = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset)
            head = f.read(30)
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            out.append((info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size, info.CRC))
    return out


@pytest.fixture()
def pair(tmp_path):
    """The same dict through torch.save and through our writer (same file name: same archive name)."""
    tensors = _tensors()
    (tmp_path / "ref").mkdir()
    (tmp_path / "our").mkdir()
    ref, our = tmp_path / "ref/model_optim_rng.pt", tmp_path / "our/model_optim_rng.pt"
    torch.save(_obj(collections.OrderedDict((k, v.contiguous().clone()) for k, v in tensors.items())), ref)
    _write_ours(our, tensors)
    return tensors, ref, our


def test_same_records_and_bytes_as_torch_save(pair):
    _, ref, our = pair
    with zipfile.ZipFile(ref) as zr, zipfile.ZipFile(our) as zo:
        assert zo.namelist() == zr.namelist()
        assert zo.namelist()[:4] == [f"model_optim_rng/{n}" for n in
                                     ("data.pkl", ".format_version", ".storage_alignment", "byteorder")]
        assert zo.namelist()[-2:] == ["model_optim_rng/version", "model_optim_rng/.data/serialization_id"]
        for name in zr.namelist():
            a, b = zr.read(name), zo.read(name)
            if name.endswith("serialization_id"):
                # names hash (first 20 digits) is ours; the combined CRCs (last 20) are torch's
                assert len(a) == len(b) == 40 and a[20:] == b[20:]
            else:
                assert a == b, name
    # the whole file is torch's once the id's first 20 digits (and so its CRC) are set equal
    ref_bytes, ours = ref.read_bytes(), bytearray(our.read_bytes())
    assert len(ours) == len(ref_bytes)
    (_, off, _, crc_ours), = [r for r in _records(our) if r[0].endswith("serialization_id")]
    ref_id = ref_bytes[off:off + 40]
    ours[off:off + 40] = ref_id
    old, new = struct.pack("<I", crc_ours), struct.pack("<I", zlib.crc32(ref_id))
    assert ours.count(old) == 2  # data descriptor and central directory
    assert bytes(ours.replace(old, new)) == ref_bytes


def test_loads_bit_identical_with_and_without_mmap(pair):
    tensors, _, our = pair
    for mmap in (False, True):
        got = torch.load(our, weights_only=True, mmap=mmap)
        assert got["checkpoint_version"] == 3.0 and got["iteration"] == 0
        assert list(got["model"]) == list(tensors)
        for k, v in tensors.items():
            t = got["model"][k]
            assert t.dtype == v.dtype and t.shape == v.shape, k
            assert torch.equal(t.contiguous().view(-1).view(torch.uint8) if t.numel() else t,
                               v.contiguous().view(-1).view(torch.uint8) if v.numel() else v), k


def test_valid_zip_and_aligned(pair):
    _, _, our = pair
    with zipfile.ZipFile(our) as z:
        assert z.testzip() is None
    for name, offset, _, _ in _records(our):
        assert offset % 64 == 0, name


def test_zip64_records_and_offsets(tmp_path, monkeypatch):
    """The ZIP64 fields torch's miniz writes past 4 GiB (record size, record offset, end records),
    exercised with the threshold lowered: zipfile checks the CRCs, torch.load reads the data."""
    monkeypatch.setattr(torch_zip, "ZIP64_LIMIT", 300)
    tensors = _tensors()
    path = tmp_path / "big.pt"
    _write_ours(path, tensors)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        infos = z.infolist()
    sizes = {i.filename.split("/", 1)[1]: i for i in infos}
    assert sizes["data/0"].file_size >= 300 or sizes["data/2"].file_size >= 300  # a large record
    assert infos[-1].header_offset >= 300  # records past the threshold
    for info in infos:
        if info.file_size >= 300 or info.header_offset >= 300:
            assert info.extra[:2] == b"\x01\x00", info.filename  # ZIP64 field in the central directory
    for name, offset, _, _ in _records(path):
        assert offset % 64 == 0, name
    for mmap in (False, True):
        got = torch.load(path, weights_only=True, mmap=mmap)["model"]
        for k, v in tensors.items():
            assert torch.equal(got[k], v), k
    raw = path.read_bytes()
    assert raw[-22:-18] == b"PK\x05\x06" and struct.unpack("<I", raw[-6:-2])[0] == 0xFFFFFFFF


def test_streams_from_tensor_memory_to_a_partial_name(tmp_path, monkeypatch):
    """Chunks are slices of the tensor's own memory (nothing copied whole); the target name
    appears only at close; abort leaves nothing."""
    monkeypatch.setattr(torch_zip, "CHUNK", 1000)
    t = torch.arange(10_000, dtype=torch.int32)
    path = tmp_path / "x.pt"
    w = TorchZipWriter(path)
    w.write_preamble(b"\x80\x02}q\x00.")
    w.write_record("data/0", tensor_bytes(t))
    assert not path.exists() and (tmp_path / "x.pt.partial").exists()
    w.close()
    assert path.exists() and not (tmp_path / "x.pt.partial").exists()
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        assert z.read("x/data/0") == t.numpy().tobytes()
    w = TorchZipWriter(tmp_path / "y.pt")
    w.write_record("data/0", tensor_bytes(t))
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_missing_tensor_leaves_no_file(tmp_path):
    from gptoss_verify.formats.errors import CheckpointError
    tensors = _tensors()
    f = StreamingTorchFile(tmp_path / "m.pt", [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], _obj)
    f.put("bf16", tensors["bf16"])
    with pytest.raises(CheckpointError, match="never written"):
        f.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.fullsize
def test_real_zip64_matches_torch_save(tmp_path):
    """A record over 4 GiB and records past 4 GiB, against torch.save byte for byte (about 9 GB
    written, 4 GB held): opt-in."""
    big = torch.zeros(4 * 2**30 + 100, dtype=torch.uint8)
    big[-1] = 7
    tensors = collections.OrderedDict([("a", big), ("b", torch.arange(3)), ("c", torch.empty(0))])
    (tmp_path / "ref").mkdir()
    (tmp_path / "our").mkdir()
    ref, our = tmp_path / "ref/f.pt", tmp_path / "our/f.pt"
    torch.save(_obj(tensors), ref)
    _write_ours(our, tensors)
    ra, ro = _records(ref), _records(our)
    assert [r[:3] for r in ra] == [r[:3] for r in ro]
    assert [r[3] for r in ra][:-1] == [r[3] for r in ro][:-1]
    with open(ref, "rb") as fa, open(our, "rb") as fb:
        head = ra[4][1]  # everything up to the big record's data, then everything after it
        assert fa.read(head) == fb.read(head)
        fa.seek(ra[4][1] + ra[4][2])
        fb.seek(ro[4][1] + ro[4][2])
        tail_a, tail_b = fa.read(), fb.read()
    assert len(tail_a) == len(tail_b)
    assert sum(x != y for x, y in zip(tail_a, tail_b)) <= 20 + 8  # id digits and its CRC twice


def test_a_stored_tensor_reads_into_a_destination(tmp_path):
    """`StoredTensor.load(out=)` (the Megatron reader fills vocabulary rows in place): contiguous
    records straight into `out`, a record saved as a strided view through a copy, a wrong shape refused."""
    from gptoss_verify.formats.fileio.torch_save_file import index
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    torch.save({"plain": base.clone(), "view": base.t()}, tmp_path / "x.pt")
    stored = index(tmp_path / "x.pt")
    for name, want in (("plain", base), ("view", base.t())):
        out = torch.full(want.shape, -1.0)
        assert stored[name].load(out=out) is out and torch.equal(out, want), name
    with pytest.raises(ValueError, match=r"into torch.float32 \[6, 4\]"):
        stored["plain"].load(out=torch.empty(6, 4))
