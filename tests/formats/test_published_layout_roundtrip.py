"""Round trips of MXFP4 checkpoints back to the published HF layout, byte for byte, from disk.

The full-width test builds the published gpt-oss-20b layout with 2 layers (names, shapes, dtypes,
vocabulary 201088; layout-only synthetic bytes shaped as an OCP encoder writes them) and checks
HF (MXFP4) -> Megatron tp2 x ep4 -> HF (`--mxfp4`) and HF -> OpenAI -> HF: every file that comes
back equals the source's, byte for byte (safetensors headers, tensor data, config.json), read
from disk. It writes about 20 GB and takes about 3 minutes on a 2-core machine (166 s measured),
so it is marked `fullsize` and runs only when asked (a plain `pytest -n auto` skips it):
`GPTOSS_RUN_SLOW=1 python -m pytest tests/formats/test_published_layout_roundtrip.py` (or `-m fullsize`).
"""
from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import pytest

from gptoss_verify.config import preset
from gptoss_verify.convert import compare, convert


def same_files(a: Path, b: Path) -> list[str]:
    """Names of files that differ or exist on one side only (empty when the trees are equal)."""
    names_a = sorted(p.name for p in a.iterdir())
    names_b = sorted(p.name for p in b.iterdir())
    if names_a != names_b:
        return sorted(set(names_a) ^ set(names_b))
    return [n for n in names_a if not filecmp.cmp(a / n, b / n, shallow=False)]


def test_tiny_mxfp4_via_megatron_back_to_mxfp4(hf_mxfp4, tmp_path):
    """`--mxfp4` on the way back: an OCP-encoded source returns as the same blocks and scales
    (compared as bytes, not through decoding)."""
    convert(hf_mxfp4, tmp_path / "m", "megatron", tp=2, ep=2)
    back = convert(tmp_path / "m", tmp_path / "hf", "hf", mxfp4=True)
    assert any("quantised with the OCP MX rule" in n for n in back.notes)
    diffs, missing, extra = compare(hf_mxfp4, "hf", tmp_path / "hf", "hf")
    assert not missing and not extra
    assert any(d.name.endswith("_blocks") for d in diffs) and not any(d.decoded for d in diffs)
    assert all(d.bit_exact for d in diffs), [d.name for d in diffs if not d.bit_exact]


def test_mxfp4_flag_needs_an_mxfp4_target(hf_mxfp4, tmp_path):
    from gptoss_verify.formats.errors import CheckpointError
    with pytest.raises(CheckpointError, match="--mxfp4"):
        convert(hf_mxfp4, tmp_path / "m", "megatron", mxfp4=True)
    assert not (tmp_path / "m").exists()


@pytest.mark.fullsize
def test_published_20b_layout_two_layers_full_width(tmp_path):
    from gptoss_verify.formats import hf
    from gptoss_verify.formats.synthetic import iter_layout_weights
    spec = preset("gpt-oss-20b").with_layers(2)
    src = tmp_path / "hf"
    hf.write(iter_layout_weights(spec, seed=1, mxfp4=True), spec, src, mxfp4=True)
    assert spec.vocab_size == 201088 and spec.hidden_size == 2880 and spec.num_experts == 32
    assert len(hf.list_tensors(src)) == 2 * 19 + 3

    convert(src, tmp_path / "megatron", "megatron", tp=2, ep=4)
    convert(tmp_path / "megatron", tmp_path / "hf-via-megatron", "hf", mxfp4=True)
    shutil.rmtree(tmp_path / "megatron")
    assert same_files(src, tmp_path / "hf-via-megatron") == []
    shutil.rmtree(tmp_path / "hf-via-megatron")

    convert(src, tmp_path / "openai", "openai")
    convert(tmp_path / "openai", tmp_path / "hf-via-openai", "hf")
    assert same_files(src, tmp_path / "hf-via-openai") == []
