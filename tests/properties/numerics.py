"""The comparison the laws share: both sides of an identity judged by the `law` rows of the one
tolerance table (`gptoss_verify/tolerances.py`), relative to max(1, the largest magnitude compared),
so that a law holds to the precision the dtype can carry and no looser."""
from __future__ import annotations

import torch

from gptoss_verify.judge import check
from gptoss_verify.tolerances import tolerance


def law_tolerance(dtype: torch.dtype) -> float:
    """The `law` row's relative tolerance in `dtype` (some laws scale it, e.g. a tie gap)."""
    return tolerance(dtype, "law").limit


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 scale: float | None = None) -> None:
    """|actual − expected| ≤ tol(dtype) · max(1, scale or max|expected|), elementwise."""
    expected = expected.double().cpu()
    actual = actual.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual[~torch.isfinite(actual)][:4].tolist()}"
    verdict = check("law", dtype, actual, expected, scale=scale)
    assert verdict.passed, f"{what}: {verdict}"
