"""Shared fixtures: small canonical weights for the Megatron layout tests."""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.config import preset
from gptoss_verify.weights import random_weights


def tiny_spec(**changes):
    """The tiny preset (H=64 != I=96) with 2 layers; 4 KV heads so that tp=4 divides them."""
    return preset("tiny").replace(num_layers=2, num_kv_heads=4, **changes)


def square_spec():
    """H == I, as in the real models (a missing transpose of down_proj passes every shape check)."""
    return tiny_spec(intermediate_size=64)


@pytest.fixture(scope="session")
def tiny_weights():
    spec = tiny_spec()
    return spec, random_weights(spec, seed=3, profile="typical", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def square_weights():
    spec = square_spec()
    return spec, random_weights(spec, seed=4, profile="typical", dtype=torch.bfloat16)
