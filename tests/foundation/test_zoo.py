"""Every bug-zoo fault makes the default parity run fail, first at the point where it lives."""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.config import preset
from gptoss_verify.model.faults import FAULTS
from gptoss_verify.parity.run import ParityCase, run_case

DEFAULT_CASES = [(dtype, profile) for profile in ("typical", "stress") for dtype in (torch.float64, torch.bfloat16)]


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_caught_at_its_point(fault):
    expected_point = FAULTS[fault].point
    divergences = []
    for dtype, profile in DEFAULT_CASES:
        result = run_case(ParityCase(preset("tiny"), dtype, profile, 0, 2, 40, 0, faults=(fault,)))
        if result.first_divergence is not None:
            divergences.append(result.first_divergence)
    assert divergences, f"{fault} went unseen by every default case"
    for fd in divergences:
        assert fd.mode == "teacher-forced"
        assert (fd.layer, fd.point) == (0, expected_point), f"{fault} first seen at {fd.name}"


def test_no_fault_no_divergence():
    for dtype, profile in DEFAULT_CASES:
        assert run_case(ParityCase(preset("tiny"), dtype, profile, 0, 2, 40, 0)).passed


def test_unknown_fault_is_refused():
    from gptoss_verify.backends import block_functions
    with pytest.raises(ValueError, match="unknown fault"):
        block_functions("reference", ["window-130"])
