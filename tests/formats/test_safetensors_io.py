"""Planned safetensors writes read back by safetensors' own reader; header checks; atomic directories."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss_verify.formats.errors import CheckpointError
from gptoss_verify.formats.fileio.partials import atomic_directory
from gptoss_verify.formats.safetensors_io import (PlannedWriter, SafetensorsDir,
                                                  hf_shard_name, plan_shards, read_header)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b": torch.randint(0, 256, (4, 2, 16), generator=g, dtype=torch.int64).to(torch.uint8),
        "c": torch.randn(7, generator=g),
        "d": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "e": torch.zeros(0, 3),
    }


@pytest.mark.parametrize("max_bytes", [10**9, 40])
def test_planned_write_reads_back_with_safetensors(tmp_path, max_bytes):
    tensors = _tensors()
    plan = plan_shards([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], max_bytes, hf_shard_name)
    writer = PlannedWriter(tmp_path, plan)
    for name in reversed(list(tensors)):  # any order
        writer.put(name, tensors[name])
    writer.finish()
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_bytes == 10**9:
        assert files == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    else:
        n = len(files)
        assert n > 2 and files == [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)]
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / f))  # safetensors' own reader
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    ours = SafetensorsDir(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(ours.get(name), t)


def test_planned_writer_refuses_what_is_not_planned(tmp_path):
    writer = PlannedWriter(tmp_path, [("model.safetensors", [("a", (2, 3), torch.bfloat16), ("b", (4,), torch.uint8)])])
    with pytest.raises(CheckpointError, match=r"tensor a: expected BF16 \[2, 3\], got torch.float32 \[2, 3\]"):
        writer.put("a", torch.zeros(2, 3))
    with pytest.raises(CheckpointError, match=r"tensor a: expected BF16 \[2, 3\], got torch.bfloat16 \[3, 2\]"):
        writer.put("a", torch.zeros(3, 2, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match="unexpected tensor zz"):
        writer.put("zz", torch.zeros(1))
    writer.put("a", torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match="tensor a given twice"):
        writer.put("a", torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*first b"):
        writer.finish()


def test_atomic_directory_leaves_nothing_on_error(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(dst) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(dst) as tmp:
        (tmp / "x").write_text("whole")
    assert (dst / "x").read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        with atomic_directory(dst):
            pass


def _one_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, path)
    return path


def test_truncated_file_is_named(tmp_path):
    path = _one_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"m\.safetensors: truncated: tensor w ends at data byte 256"):
        read_header(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        read_header(path)


def test_corrupt_header_is_named(tmp_path):
    path = _one_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[9] = ord("#")  # inside the JSON
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"m\.safetensors: corrupt safetensors header"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors header"):
        read_header(path)


def test_index_naming_a_missing_file(tmp_path):
    _one_file(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"w": "m.safetensors", "v": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"names file gone\.safetensors \(for tensor v\), which does not exist"):
        SafetensorsDir(tmp_path)


def test_prefetch_reads_the_named_tensors_in_file_order_and_nothing_else(tmp_path, monkeypatch):
    """`SafetensorsSource.prefetch` (HF -> Megatron reads the next layer ahead) asks for exactly the
    named tensors' spans, MXFP4 pairs included, sorted by file and offset; reads still match."""
    from gptoss_verify.formats.megatron import source as megatron_source
    g = torch.Generator().manual_seed(1)
    tensors = {"x.gate_up_proj_blocks": torch.randint(0, 256, (2, 3, 4, 16), generator=g, dtype=torch.uint8),
               "x.gate_up_proj_scales": torch.randint(100, 140, (2, 3, 4), generator=g, dtype=torch.uint8),
               "y.weight": torch.randn(5, 4, generator=g).to(torch.bfloat16), "z.weight": torch.randn(6, generator=g)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    from gptoss_verify.formats.fileio import readahead
    asked = []
    real = readahead._read
    monkeypatch.setattr(readahead, "_read", lambda file, parts, stop: (asked.append((file, parts)), real(file, parts, stop)))
    src = megatron_source.SafetensorsSource(SafetensorsDir(tmp_path))
    src.prefetch(["z.weight", "x.gate_up_proj", "missing.weight"])
    src._ahead._pool.shutdown(wait=True)  # let the queued read run (close() would drop it)
    src.close()
    info = src.infos
    want = sorted((info[n].offset, info[n].nbytes) for n in ("z.weight", "x.gate_up_proj_blocks", "x.gate_up_proj_scales"))
    assert asked == [(tmp_path / "model.safetensors", want)]
    src = megatron_source.SafetensorsSource(SafetensorsDir(tmp_path))
    src.prefetch(["y.weight"])
    assert torch.equal(src.rows("y.weight", 1, 4), tensors["y.weight"][1:4])
    src.close()
