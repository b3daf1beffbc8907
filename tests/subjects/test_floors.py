"""A subject's stated precision floor (`protocol.Floor`): in its dtype, every point from the first
`start` point on is judged by the floor's tolerance kind, and the verdict says so; elsewhere the
default kinds judge, so a floor never loosens what it does not name."""
from __future__ import annotations

import torch

from gptoss_verify.config import preset
from gptoss_verify.subjects.judging import judge_output, truth_and_reference
from gptoss_verify.subjects.protocol import ALL_POINTS, Case, Floor, Output

SPEC = preset("tiny").replace(num_layers=2)
FLOOR = Floor(dtype="float64", start="topk_weights", kind="router-float32", why="a test's floor")


def _truth_as_subject(case):
    truth, ref = truth_and_reference(case)
    return Output(truth.logits.clone(), {n: t.clone() for n, t in truth.points.items()}), (truth, ref)


def test_floor_applies_from_its_point_on_in_its_dtype_only():
    case = Case.random(SPEC, torch.float64, batch=2, seq=12)
    out, base = _truth_as_subject(case)
    v = judge_output(out, case, ALL_POINTS, "s", base, floors=(FLOOR,))
    kinds = {c.name: c.verdict.kind for c in v.cells}
    assert kinds["layers.0.router_logits"] == "oracle" and kinds["layers.0.topk_idx"] == "routing"
    assert kinds["layers.0.topk_weights"] == kinds["layers.1.q"] == kinds["logits"] == "router-float32"
    assert v.floors == ["router-float32 from topk_weights on: a test's floor"]
    # an error the floor does not cover still fails by the default kind
    out.points["layers.0.mlp_norm"] = out.points["layers.0.mlp_norm"] * (1 + 1e-9)
    bad = judge_output(out, case, ALL_POINTS, "s", base, floors=(FLOOR,)).first_failure
    assert bad is not None and bad.name == "layers.0.mlp_norm" and bad.verdict.kind == "oracle"


def test_a_floor_of_another_dtype_changes_nothing():
    case = Case.random(SPEC, torch.float32, batch=2, seq=12)
    truth, ref = truth_and_reference(case)
    v = judge_output(ref, case, ALL_POINTS, "s", (truth, ref), floors=(FLOOR,))
    assert v.floors == [] and all(c.verdict.kind != "router-float32" for c in v.cells)
