"""Fixtures for the checkpoint-layout tests: tiny checkpoints written through the CLI, file hashes."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gptoss_verify.cli import main
from gptoss_verify.config import preset

TINY = preset("tiny")
# the square toy: H == I as in the real models, so a missing transpose of down_proj passes shapes
SQUARE = TINY.replace(intermediate_size=64, name="tiny-square")


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def tree_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (relative name -> digest)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def hf_mxfp4(tmp_path_factory) -> Path:
    """tiny HF MXFP4 checkpoint, sharded (small max shard) with an index."""
    out = tmp_path_factory.mktemp("ckpt") / "hf-mxfp4"
    assert cli("make-checkpoint", out, "--mxfp4", "--max-shard-size", 200_000, "--seed", 3) == 0
    return out


@pytest.fixture(scope="session")
def hf_bf16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "hf-bf16"
    assert cli("make-checkpoint", out, "--seed", 4) == 0
    return out
