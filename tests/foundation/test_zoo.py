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


def test_faults_swap_in_where_their_reference_function_stands():
    """A fault's mutant takes the place of the reference function it replaces in the backend's
    table; under `fused` the kernels stand in place of attention and the MoE, so faults there
    change nothing, while norm and RoPE faults still apply. Two faults on one function are refused."""
    from gptoss_verify.backends import backend_table, block_functions
    from gptoss_verify.model import REFERENCE

    assert all(f.replaces in vars(REFERENCE).values() for f in FAULTS.values())
    ref = block_functions("reference", ["window-129", "norm-eps-1e-6", "gate-up-halves"])
    assert ref == REFERENCE.replace(attention=FAULTS["window-129"].mutant, rms_norm=FAULTS["norm-eps-1e-6"].mutant,
                                    moe=FAULTS["gate-up-halves"].mutant)
    fused = block_functions("fused", ["window-129", "gate-up-halves", "yarn-truncate"])
    assert fused == backend_table("fused").replace(cos_sin=FAULTS["yarn-truncate"].mutant)
    with pytest.raises(ValueError, match="both replace attention"):
        block_functions("reference", ["window-129", "sink-scaled"])
