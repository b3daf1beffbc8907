"""The bad-input corpus (issue 4 item 7): each broken checkpoint or bad request gets one clear error
naming the file and tensor, exit 1, no DST left behind, SRC unchanged (hashes before and after)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import cli, tree_hashes


def _single_file_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst / "model.safetensors"


def _rewrite(file: Path, change) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _shard_of(ckpt: Path, name: str) -> Path:
    return ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]


def case_truncated_shard(tmp, hf_bf16, hf_mxfp4):
    ckpt = tmp / "src"
    shutil.copytree(hf_mxfp4, ckpt)
    shard = _shard_of(ckpt, "lm_head.weight")
    shard.write_bytes(shard.read_bytes()[:-100])
    return ckpt, [shard.name, "truncated", "ends at data byte"]


def case_corrupt_header(tmp, hf_bf16, hf_mxfp4):
    ckpt = tmp / "src"
    shutil.copytree(hf_mxfp4, ckpt)
    shard = _shard_of(ckpt, "model.layers.0.self_attn.sinks")
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\x00\xff{]"
    shard.write_bytes(bytes(data))
    return ckpt, [shard.name, "corrupt safetensors header"]


def case_index_names_missing_file(tmp, hf_bf16, hf_mxfp4):
    ckpt = tmp / "src"
    shutil.copytree(hf_mxfp4, ckpt)
    shard = _shard_of(ckpt, "model.layers.1.mlp.router.weight")
    shard.unlink()
    return ckpt, ["model.safetensors.index.json", shard.name, "does not exist"]


def case_missing_tensor(tmp, hf_bf16, hf_mxfp4):
    f = _single_file_copy(hf_bf16, tmp / "src")
    _rewrite(f, lambda t: t.pop("model.layers.2.self_attn.sinks"))
    return f.parent, ["model.layers.2.self_attn.sinks", "missing", "absent"]


def case_extra_tensor(tmp, hf_bf16, hf_mxfp4):
    f = _single_file_copy(hf_bf16, tmp / "src")
    _rewrite(f, lambda t: t.update({"model.layers.0.self_attn.rotary.inv_freq": torch.zeros(8, dtype=torch.bfloat16)}))
    return f.parent, ["model.safetensors", "model.layers.0.self_attn.rotary.inv_freq", "extra"]


def case_wrong_shape(tmp, hf_bf16, hf_mxfp4):
    f = _single_file_copy(hf_bf16, tmp / "src")
    # down_proj stored as [E, H, I] (the transposed mistake) instead of [E, I, H]
    _rewrite(f, lambda t: t.update({"model.layers.1.mlp.experts.down_proj":
                                    t["model.layers.1.mlp.experts.down_proj"].transpose(1, 2).contiguous()}))
    return f.parent, ["model.safetensors", "model.layers.1.mlp.experts.down_proj", "shape",
                      "expected BF16 [8, 96, 64]", "[8, 64, 96]"]


def case_wrong_dtype(tmp, hf_bf16, hf_mxfp4):
    f = _single_file_copy(hf_bf16, tmp / "src")
    _rewrite(f, lambda t: t.update({"model.layers.3.self_attn.sinks": t["model.layers.3.self_attn.sinks"].float()}))
    return f.parent, ["model.safetensors", "model.layers.3.self_attn.sinks", "dtype", "expected BF16 [8]", "F32 [8]"]


def case_nan(tmp, hf_bf16, hf_mxfp4):
    f = _single_file_copy(hf_bf16, tmp / "src")

    def poison(t):
        w = t["model.layers.2.mlp.router.bias"].clone()
        w[3] = float("nan")
        t["model.layers.2.mlp.router.bias"] = w
    _rewrite(f, poison)
    return f.parent, ["model.layers.2.mlp.router.bias", "NaN"]


def case_bad_config(tmp, hf_bf16, hf_mxfp4):
    ckpt = tmp / "src"
    shutil.copytree(hf_bf16, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_attention_heads"] = 7  # not a multiple of the 2 KV heads
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt, ["config.json", "num_heads"]


CASES = {f.__name__[5:]: f for f in (case_truncated_shard, case_corrupt_header, case_index_names_missing_file,
                                     case_missing_tensor, case_extra_tensor, case_wrong_shape, case_wrong_dtype,
                                     case_nan, case_bad_config)}


def _fails_cleanly(capsys, argv, src: Path, dst: Path | None, expect: list[str]) -> str:
    before = tree_hashes(src)
    parent_before = sorted(p.name for p in dst.parent.iterdir()) if dst is not None else None
    capsys.readouterr()
    rc = cli(*argv)
    out, err = capsys.readouterr()
    assert rc == 1, (out, err)
    text = err or out
    for piece in expect:
        assert piece in text, f"{piece!r} not in {text!r}"
    assert tree_hashes(src) == before, "the source changed"
    if dst is not None:
        assert not dst.exists() or not any(dst.iterdir()), "a destination was left behind"
        assert sorted(p.name for p in dst.parent.iterdir()) == parent_before, "temporary output left behind"
    return text


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("to", ["openai", "hf", "megatron"])  # megatron: HF slices read in place
def test_convert_refuses(case, to, tmp_path, capsys, hf_bf16, hf_mxfp4):
    src, expect = CASES[case](tmp_path, hf_bf16, hf_mxfp4)
    (tmp_path / "out").mkdir()
    dst = tmp_path / "out" / "dst"
    err = _fails_cleanly(capsys, ["convert", src, dst, "--to", to], src, dst, expect)
    assert err.startswith("gptoss-verify convert: error: ") and err.count("\n") == 1  # one line


@pytest.mark.parametrize("case", sorted(CASES))
def test_inspect_reports(case, tmp_path, capsys, hf_bf16, hf_mxfp4):
    src, expect = CASES[case](tmp_path, hf_bf16, hf_mxfp4)
    _fails_cleanly(capsys, ["inspect", src, "--scan"], src, None, expect)


def test_roundtrip_refuses_a_broken_source(tmp_path, capsys, hf_bf16, hf_mxfp4):
    src, expect = case_wrong_shape(tmp_path, hf_bf16, hf_mxfp4)
    (tmp_path / "work").mkdir()
    _fails_cleanly(capsys, ["roundtrip", src, "--via", "openai", "--work-dir", tmp_path / "work"], src,
                   tmp_path / "work" / "x", expect)


@pytest.mark.parametrize("flag, value, what", [("--tp", 3, "2 KV heads"), ("--ep", 3, "8 experts"),
                                               ("--pp", 3, "4 layers"), ("--tp", 0, "2 KV heads")])
@pytest.mark.parametrize("to", ["megatron", "megatron-dist"])
def test_parallel_sizes_that_do_not_divide(flag, value, what, to, tmp_path, capsys, hf_mxfp4):
    dst = tmp_path / "dst"
    _fails_cleanly(capsys, ["convert", hf_mxfp4, dst, "--to", to, flag, value], hf_mxfp4, dst,
                   [f"{flag} {value}", what])


def test_destination_not_empty(tmp_path, capsys, hf_mxfp4):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    _fails_cleanly(capsys, ["convert", hf_mxfp4, dst, "--to", "openai"], hf_mxfp4, dst / "sub",
                   [str(dst), "exists and is not empty"])
    assert (dst / "keep.txt").read_text() == "mine" and len(list(dst.iterdir())) == 1


def test_source_equals_destination(tmp_path, capsys, hf_mxfp4):
    src = tmp_path / "src"
    shutil.copytree(hf_mxfp4, src)
    _fails_cleanly(capsys, ["convert", src, src, "--to", "hf"], src, None, ["destination is the source"])
    _fails_cleanly(capsys, ["convert", src, src / "inner", "--to", "openai"], src, None, ["inside the source"])


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails_cleanly(capsys, ["convert", tmp_path / "empty", tmp_path / "dst", "--to", "hf"], tmp_path / "empty",
                   tmp_path / "dst", ["no known checkpoint layout"])
    _fails_cleanly(capsys, ["inspect", tmp_path / "nope"], tmp_path, None, ["does not exist"])


def test_an_empty_destination_directory_is_used(tmp_path, hf_mxfp4):
    dst = tmp_path / "dst"
    dst.mkdir()
    assert cli("convert", hf_mxfp4, dst, "--to", "openai") == 0
    assert (dst / "model.safetensors").exists()
