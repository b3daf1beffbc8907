"""megatron-core's own GPTModel, loaded from our legacy files with `load_state_dict(strict=True)`,
computes our model: every trace point of its forward (hooks on its modules) judged against our
float64 truth by the one judge, its stated float32 router floor applied and reported; each
deliberate layout or setting error is named at the first point where it shows."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from gptoss_verify.subjects.judging import judge_output  # noqa: E402
from gptoss_verify.subjects.megatron_core import ROUTER_FLOAT32, MegatronCore  # noqa: E402
from gptoss_verify.subjects.protocol import LAYER_POINTS, point_names  # noqa: E402
from gptoss_verify.subjects.registry import resolve  # noqa: E402

from .conftest import SPEC, case  # noqa: E402

BEFORE_ROUTING = LAYER_POINTS[LAYER_POINTS.index("attn_norm"):LAYER_POINTS.index("topk_idx")]
#: negative control -> the first trace point where it shows (q is traced before attn_core, the
#: router logits before topk_weights: those are the first divergences)
CONTROLS = {"fc1-interleaved": "layers.0.mlp_out", "qkv-ungrouped": "layers.0.q",
            "router-bias-dropped": "layers.0.router_logits", "window-W": "layers.0.attn_core",
            "bias-activation-fusion": "layers.0.mlp_out"}


def judged(subject, c, output):
    return judge_output(output, c, subject.points, subject.name, floors=subject.floors)


def assert_parity(subject, c, output):
    v = judged(subject, c, output)
    assert v.first_failure is None, f"{subject.name} {c.dtype_name}: first failure {v.first_failure}"
    names = [cell.name for cell in v.cells]
    every = [n for n in point_names(c.spec, subject.points) if not n.endswith(".input")]
    assert names[:len(every)] == every  # every point of every layer was judged, in trace order
    if c.dtype == torch.float64:
        before = [cell for cell in v.cells if cell.name.split(".")[-1] in BEFORE_ROUTING]
        assert len(before) == len(BEFORE_ROUTING) * c.spec.num_layers
        layer0 = [cell for cell in before if cell.name.startswith("layers.0.")]
        assert all(cell.verdict.kind == "oracle" and cell.verdict.error < 1e-13 for cell in layer0), layer0
        assert v.floors == [f"router-float32 from topk_weights on: {ROUTER_FLOAT32.why}"]  # stated, not hidden
        assert next(cell for cell in v.cells if cell.name == "logits").verdict.kind == "router-float32"
    else:
        assert v.floors == []
    return v


def test_tp1_parity_and_negative_controls():
    """float64 and float32 pass at every point; each control fails first where it should (one
    process group for all of them)."""
    subject = resolve("megatron-core")
    assert isinstance(subject, MegatronCore)
    c64, c32 = case(torch.float64), case(torch.float32)
    faults = list(CONTROLS)
    outs = subject.run_many([c64, c32] + [c64] * len(faults), [None, None, *faults])
    assert_parity(subject, c64, outs[0])
    assert_parity(subject, c32, outs[1])
    for fault, out in zip(faults, outs[2:]):
        bad = judged(subject, c64, out).first_failure
        assert bad is not None and bad.name == CONTROLS[fault], (fault, bad)
    # placement only was redirected, and counted: CUDA device queries and masks, the RNG fork
    assert subject.redirects and all(n > 0 for n in subject.redirects.values())
    assert {"transformer/moe/router.py: torch.cuda.current_device()",
            'transformer/utils.py: torch.ones(device="cuda")'} <= set(subject.redirects)


def test_bias_activation_fusion_quirk_is_a_failure_in_float32_too():
    """Megatron-Bridge's setting on the local path (clamp before the fc1 bias) is not GPT-OSS:
    the judge fails it at mlp_out in float32 as well, by far more than the truth rule's bound."""
    subject = MegatronCore(fault="bias-activation-fusion")
    c = case(torch.float32, seed=1)
    v = judged(subject, c, subject.run(c))
    bad = v.first_failure
    assert bad is not None and bad.name == "layers.0.mlp_out"
    assert bad.verdict.error > 100 * bad.verdict.bound


def test_local_names_and_bfloat16():
    """Files written with the local spec's names load strictly as they are; bf16 passes the truth rule."""
    subject = MegatronCore(names="local")
    c = case(torch.bfloat16, seed=2)
    assert_parity(subject, c, subject.run(c))


def test_an_offset_is_refused_not_misjudged():
    from gptoss_verify.subjects.protocol import SubjectUnavailable
    import dataclasses
    with pytest.raises(SubjectUnavailable, match="offset"):
        MegatronCore().run(dataclasses.replace(case(torch.float32), offset=5))
    assert SPEC.num_layers == 2


def test_float32_norm_weights_are_cast_and_said():
    """The local spec's RMSNorm weights are float32 whatever the dtype: cast like Float16Module,
    listed; nothing else is cast."""
    subject = MegatronCore()
    subject.run(case(torch.float64, seed=3))
    assert subject.casts and all(dt == "float32" for dt in subject.casts.values())
    assert all(n.endswith("layernorm.weight") for n in subject.casts), subject.casts
