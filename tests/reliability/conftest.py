"""Fixtures of the reliability tests: one small source checkpoint, tree hashes, partial listings."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from gptoss_verify.cli import main

#: the thorough size (more kill points, more failure points) comes with the thorough hypothesis profile
THOROUGH = os.environ.get("GPTOSS_HYPOTHESIS_PROFILE") == "thorough"


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def tree_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (relative name -> digest); {} for a missing path."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent: Path, keep=()) -> list[str]:
    """Entries of `parent` other than `keep`: partials, owner records, anything half-written."""
    return sorted(n for n in os.listdir(parent) if n not in keep)


@pytest.fixture(scope="session")
def small_mxfp4(tmp_path_factory) -> Path:
    """A 2-layer tiny HF MXFP4 checkpoint, sharded with an index: the source of the conversions."""
    out = tmp_path_factory.mktemp("rel-src") / "hf-mxfp4"
    assert cli("make-checkpoint", out, "--mxfp4", "--layers", 2, "--max-shard-size", 60_000, "--seed", 7) == 0
    return out
