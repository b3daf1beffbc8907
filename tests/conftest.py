"""Shared fixtures, marks and hypothesis profiles.

Profiles: `ci` (derandomized, bounded, no deadline; the default) and `thorough` (many more
examples: 500, or GPTOSS_HYPOTHESIS_EXAMPLES), chosen with GPTOSS_HYPOTHESIS_PROFILE=thorough. A failing example is printed as the
call's arguments ("Falsifying example: test_x(a=..., b=...)"), which paste into `@example(...)`.
"""
from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run under the interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=int(os.environ.get("GPTOSS_HYPOTHESIS_EXAMPLES", 500)), deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("GPTOSS_HYPOTHESIS_PROFILE", "ci"))

# Under pytest-xdist each worker is one process on a shared small machine: one intra-op thread
# each, or OpenMP threads of several workers spin against each other (8 minutes instead of 1).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def has_cuda() -> bool:
    return torch.cuda.is_available()


def wants_fullsize(config) -> bool:
    """Full-size tests (GBs written) run only when asked: GPTOSS_RUN_SLOW=1 or `-m fullsize`."""
    return os.environ.get("GPTOSS_RUN_SLOW") == "1" or "fullsize" in (config.getoption("markexpr") or "")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_fullsize = pytest.mark.skip(reason="full size (GBs written): set GPTOSS_RUN_SLOW=1 or pass -m fullsize")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not has_cuda():  # the mark, not any keyword (a folder named gpu)
            item.add_marker(skip_gpu)
        if item.get_closest_marker("fullsize") is not None and not wants_fullsize(config):
            item.add_marker(skip_fullsize)
