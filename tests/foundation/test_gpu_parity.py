"""Parity on the GPU (skipped without CUDA): the same harness, the model and the oracle on cuda."""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.config import preset
from gptoss_verify.parity.run import ParityCase, run_case


@pytest.mark.gpu
@pytest.mark.parametrize("profile", ["typical", "stress"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_tiny_parity_on_cuda(dtype, profile):
    result = run_case(ParityCase(preset("tiny"), dtype, profile, 0, 2, 40, 4090, device="cuda"))
    fd = result.first_divergence
    assert result.passed, f"{fd.name} {fd.kind} {fd.measure:.3g} > {fd.bound:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiny_parity_fused_backend(dtype):
    result = run_case(ParityCase(preset("tiny"), dtype, "stress", 0, 2, 40, 4090, device="cuda", backend="fused"))
    fd = result.first_divergence
    assert result.passed, f"{fd.name} {fd.kind} {fd.measure:.3g} > {fd.bound:.3g}"
