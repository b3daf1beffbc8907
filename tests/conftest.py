"""Shared fixtures, marks and hypothesis profiles.

Profiles: `ci` (derandomized, bounded, no deadline; the default) and `thorough` (many more
examples), chosen with GPTOSS_HYPOTHESIS_PROFILE=thorough. Failing examples are printed with
`@reproduce_failure`-free, paste-able `@example(...)` blobs (print_blob=True).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("GPTOSS_HYPOTHESIS_PROFILE", "ci"))

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
