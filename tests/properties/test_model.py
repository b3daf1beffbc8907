"""Whole-model laws on the tiny preset: batch rows are independent, a position offset with a cache
equals running the prefix, and float64 results do not depend on the batch composition to 1e-12."""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.model import Transformer

from .backends import model_backends, model_blocks, params, run_law
from .numerics import assert_close
from .strategies import ModelCase, model_cases, tiny_weights

BACKENDS = model_backends()


def build(case: ModelCase, backend: str = "reference", dtype=torch.float64, device="cpu",
          model_cls=Transformer) -> Transformer:
    weights = {n: t.to(device) for n, t in tiny_weights(case.layers, case.seed, dtype).items()}
    return model_cls.from_state_dict(case.spec, weights, model_blocks(backend))


def _neighbours(case: ModelCase, ids: torch.Tensor, row: int) -> torch.Tensor:
    """The same batch with every row but `row` replaced by other tokens."""
    other = case.ids(seed_offset=1000)
    out = other.clone()
    out[row] = ids[row]
    return out


def check_rows_independent(backend: str, case: ModelCase, dtype=torch.float64, device="cpu"):
    """A row's logits do not depend on the other rows of its batch."""
    model = build(case, backend, dtype, device)
    ids = case.ids()
    row = case.seed % case.batch
    with torch.no_grad():
        a = model(ids.to(device), case.start)[row]
        b = model(_neighbours(case, ids, row).to(device), case.start)[row]
    assert_close(b, a, dtype, f"row {row} with other neighbours")
    return True


def check_offset_with_cache_equals_prefix(backend: str, case: ModelCase, dtype=torch.float64, device="cpu"):
    """Running the prefix into a cache, then the rest at start_pos = start + p, equals the rest of
    the full forward, for every split point p."""
    model = build(case, backend, dtype, device)
    ids = case.ids().to(device)
    total = ids.shape[1]
    with torch.no_grad():
        full = model(ids, case.start)
        for p in sorted({1, total // 2, total - 1} - {0, total}):
            cache = model.new_cache()
            model(ids[:, :p], case.start, cache)
            rest = model(ids[:, p:], case.start + p, cache)
            assert_close(rest, full[:, p:], dtype, f"suffix at offset {p} with the prefix cached")
    return True


def check_batch_composition_float64(backend: str, case: ModelCase, dtype=torch.float64, device="cpu"):
    """Each row run alone equals the same row inside the batch, to 1e-12 in float64."""
    model = build(case, backend, dtype, device)
    ids = case.ids().to(device)
    with torch.no_grad():
        batch = model(ids, case.start)
        for r in range(case.batch):
            alone = model(ids[r:r + 1], case.start)[0]
            assert_close(batch[r], alone, dtype, f"row {r} alone vs in a batch of {case.batch}")
    return True


@pytest.mark.parametrize("backend", params(BACKENDS))
def test_rows_independent(backend):
    run_law(check_rows_independent, backend.fn, model_cases(max_seq=12), 15, backend,
            dtype=backend.dtypes[-1], device=backend.device)


@pytest.mark.parametrize("backend", params(BACKENDS))
def test_offset_with_cache_equals_prefix(backend):
    run_law(check_offset_with_cache_equals_prefix, backend.fn, model_cases(max_seq=12), 15, backend,
            dtype=backend.precise, device=backend.device)


def test_batch_composition_float64():
    run_law(check_batch_composition_float64, "reference", model_cases(max_seq=12), 15)
