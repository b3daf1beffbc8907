"""The one judge and its table: every kind has a rule, a measure the judge knows and rows with
reasons; each rule passes and fails where it should; NaN never passes; left-out tokens are counted."""
from __future__ import annotations

import math

import pytest
import torch

from gptoss_verify import judge
from gptoss_verify.tolerances import ANY, AT_LEAST, AT_MOST, KINDS, TABLE, TRUTH, tolerance


def test_every_row_is_a_known_kind_with_a_reason():
    for (dtype, kind), tol in TABLE.items():
        assert kind in KINDS, f"row ({dtype}, {kind}): no such kind"
        assert dtype == ANY or isinstance(getattr(torch, dtype, None), torch.dtype), f"row ({dtype}, {kind})"
        assert tol.reason.strip(), f"row ({dtype}, {kind}) has no reason"
        assert (tol.factor > 0) == (KINDS[kind].rule == TRUTH), f"row ({dtype}, {kind}): factor vs rule"


def test_every_kind_has_a_row_and_a_measure():
    for name, kind in KINDS.items():
        assert kind.rule in (AT_MOST, AT_LEAST, TRUTH), name
        assert kind.measure in judge.MEASURES, f"{name}: the judge has no measure {kind.measure!r}"
        assert any(k == name for _, k in TABLE), f"kind {name} has no row"


def test_unknown_kind_or_dtype_is_named():
    with pytest.raises(KeyError, match="no comparison kind 'nonsense'"):
        judge.verdict("nonsense", torch.float32, 0.0)
    with pytest.raises(KeyError, match="'oracle' comparisons in bfloat16"):
        judge.verdict("oracle", torch.bfloat16, 0.0)


def test_any_dtype_row_applies_to_every_dtype():
    assert tolerance(torch.float16, "moe-kernel") is tolerance("bfloat16", "moe-kernel") is TABLE[(ANY, "moe-kernel")]


def test_truth_rule_bound_is_factor_times_reference_plus_floor():
    tol = tolerance(torch.bfloat16, "truth")
    bound = tol.factor * 0.01 + tol.limit
    ok = judge.verdict("truth", torch.bfloat16, bound, reference=0.01)
    bad = judge.verdict("truth", torch.bfloat16, bound * 1.001, reference=0.01)
    assert ok.passed and not bad.passed
    assert ok.bound == bound and ok.rule == TRUTH and ok.reason == tol.reason
    assert "FAIL truth (bfloat16" in str(bad)


def test_at_most_and_at_least():
    limit = tolerance(torch.float64, "oracle").limit
    assert judge.verdict("oracle", torch.float64, limit).passed
    assert not judge.verdict("oracle", torch.float64, 2 * limit).passed
    share = tolerance(torch.bfloat16, "routing").limit
    assert judge.verdict("routing", torch.bfloat16, share).passed
    assert not judge.verdict("routing", torch.bfloat16, share - 0.01).passed


@pytest.mark.parametrize("kind, dtype, reference", [("oracle", torch.float64, math.nan),
                                                     ("truth", torch.float32, 0.0),
                                                     ("truth", torch.float32, math.nan),
                                                     ("routing", torch.float32, math.nan)])
def test_nan_never_passes(kind, dtype, reference):
    error = 0.0 if math.isnan(reference) and kind == "truth" else math.nan
    assert not judge.verdict(kind, dtype, error, reference).passed


def test_check_measures_then_judges():
    truth = torch.linspace(-2, 2, 64, dtype=torch.float64)
    plain = truth.to(torch.bfloat16)
    worse = (truth + 0.05).to(torch.bfloat16)
    good = judge.check("truth", torch.bfloat16, plain, truth, plain)
    assert good.passed and good.error == good.reference
    bad = judge.check("truth", torch.bfloat16, worse, truth, plain)
    assert not bad.passed and bad.error > bad.bound
    with pytest.raises(ValueError, match="needs the plain reference"):
        judge.check("truth", torch.bfloat16, plain, truth)


def test_law_measure_is_relative_above_one_absolute_below():
    small = torch.tensor([0.1, 0.2], dtype=torch.float64)
    off = small + 0.5e-5
    assert judge.check("law", torch.float32, off, small).passed          # 5e-6 absolute ≤ 1e-5
    big = 1e6 * small
    assert judge.check("law", torch.float32, big + 1.0, big).passed      # 1 / 2e5 = 5e-6 relative
    assert not judge.check("law", torch.float32, big + 5.0, big).passed  # 2.5e-5 relative


def test_tokens_left_out_are_counted():
    ours = torch.tensor([[0, 1], [2, 3], [1, 0]])
    other = torch.tensor([[1, 0], [2, 4], [0, 1]])
    routing = judge.check("routing", torch.bfloat16, ours, other)
    assert routing.error == pytest.approx(2 / 3) and routing.excluded == 1 and not routing.passed
    truth = torch.tensor([[1.0], [50.0], [2.0]], dtype=torch.float64)
    flipped = truth.clone()
    flipped[1] = -50.0  # wild on the token routed elsewhere
    keep = torch.tensor([True, False, True])
    v = judge.check("truth", torch.float32, flipped.float(), truth, truth.float(), tokens=keep)
    assert v.passed and v.excluded == 1
