"""megatron-core itself on our files (an optional extra: every test here skips cleanly without it).

One tiny model (H=64 != I=96, 8 q / 2 kv heads, 8 experts top-4, window 16, 2 layers: one
sliding, one full; sequences of 24 > window), the standard random case (`Case.random`: every
branch exercised, experts on the MXFP4 grid)."""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.config import preset
from gptoss_verify.subjects.protocol import Case

pytest.importorskip("megatron.core")

SPEC = preset("tiny").replace(num_layers=2)


def case(dtype: torch.dtype, seed: int = 0, spec=SPEC) -> Case:
    return Case.random(spec, dtype, batch=2, seq=24, seed=seed)
