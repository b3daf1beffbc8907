"""Tolerances and comparisons shared by the laws: one relative tolerance per dtype, scaled by the
largest magnitude involved, so that a law holds to the precision the dtype can carry and no looser."""
from __future__ import annotations

import torch

# relative to the largest |value| compared; float64 laws are exact up to summation order
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 scale: float | None = None) -> None:
    """|actual − expected| ≤ TOL[dtype] · max(1, scale or max|expected|), elementwise."""
    expected = expected.double().cpu()
    actual = actual.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual[~torch.isfinite(actual)][:4].tolist()}"
    size = scale if scale is not None else (expected.abs().max().item() if expected.numel() else 0.0)
    bound = TOL[dtype] * max(1.0, size)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} ({dtype})"
