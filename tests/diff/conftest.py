"""Session fixtures: tiny checkpoints of ours (make-checkpoint) and conversions of them (convert)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptoss_verify.config import preset
from gptoss_verify.convert import convert

from .corpus import cli

TINY = preset("tiny")  # H 64 != I 96: shapes catch a transpose of the experts
# H == I as in the real models: a transpose of down_proj keeps every shape, only values show it
SQUARE = TINY.replace(intermediate_size=64, name="tiny-square")


def _make(out: Path, spec, *flags) -> Path:
    config = out.parent / f"{out.name}-config.json"
    config.write_text(json.dumps(spec.to_hf_config()))
    cli("make-checkpoint", out, "--config", config, "--seed", 5, *flags)
    return out


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> dict[str, Path]:
    """name -> checkpoint: tiny and square, bf16 and MXFP4, and the tiny MXFP4 one converted to
    every layout we write (OpenAI, Megatron tp2/ep2, torch_dist tp2, HF dequantized)."""
    root = tmp_path_factory.mktemp("diff-corpus")
    out = {
        "hf": _make(root / "hf", TINY),
        "mx": _make(root / "mx", TINY, "--mxfp4"),
        "square-hf": _make(root / "square-hf", SQUARE),
        "square-mx": _make(root / "square-mx", SQUARE, "--mxfp4"),
    }
    convert(out["mx"], root / "openai", "openai")
    convert(out["mx"], root / "megatron", "megatron", tp=2, ep=2)
    convert(out["mx"], root / "dist", "megatron-dist", tp=2)
    convert(out["mx"], root / "dequantized", "hf", dequantize=True)
    convert(out["hf"], root / "hf-megatron", "megatron", tp=2, ep=2)
    out.update(openai=root / "openai", megatron=root / "megatron", dist=root / "dist",
               dequantized=root / "dequantized", **{"hf-megatron": root / "hf-megatron"})
    return out
