"""Ours against the transformers oracle over several tiny configs (the foundation's parity grid)."""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.config import TINY_VARIANTS, preset
from gptoss_verify.parity.run import ParityCase, run_case

TINY = preset("tiny")
SHAPES = TINY_VARIANTS  # tiny (H != I), square (H = I, GQA 8:1, top-2 of 16), mha (3 layers, top-3 of 5)
CASES = [  # (shape, batch, seq, offset, seed)
    ("tiny", 2, 40, 0, 0),        # batch 2, seq 2.5x the window
    ("tiny", 1, 48, 0, 3),        # a sequence 3x the window
    ("tiny", 2, 37, 4090, 1),     # odd length, positions past 4096 (YaRN's original context)
    ("tiny", 1, 9, 131000, 2),    # near the end of the 131072 context
    ("square", 2, 33, 5, 4),
    ("mha", 3, 17, 0, 5),
]


def _describe(result) -> str:
    fd = result.first_divergence
    return "passed" if fd is None else f"{fd.name} {fd.mode} {fd.kind}: {fd.measure:.3g} > {fd.bound:.3g}"


@pytest.mark.parametrize("profile", ["typical", "stress"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,batch,seq,offset,seed", CASES)
def test_ours_matches_oracle(shape, batch, seq, offset, seed, dtype, profile):
    result = run_case(ParityCase(SHAPES[shape], dtype, profile, seed, batch, seq, offset))
    assert result.passed, _describe(result)


def test_float64_agreement_is_tight():
    """The float64 rule is 1e-12; measured agreement should sit far below it, every point."""
    result = run_case(ParityCase(TINY, torch.float64, "stress", 0, 2, 40, 4090))
    worst = max(r.measure for r in result.rows if r.kind == "oracle")
    assert worst < 1e-13


def test_typical_profile_exercises_the_clamp():
    result = run_case(ParityCase(TINY, torch.float64, "typical", 0, 2, 40, 0))
    assert 0.01 < result.clamp_share < 0.2, result.clamp_share
