"""Subjects on a tiny case: built-ins pass, a broken user subject fails at its point, dumps judged."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from gptoss_verify.config import preset
from gptoss_verify.subjects import dump as dumps
from gptoss_verify.subjects.judging import judge_subject, truth_and_reference
from gptoss_verify.subjects.protocol import Case, SubjectError, SubjectUnavailable
from gptoss_verify.subjects.registry import resolve
from gptoss_verify.weights import random_weights

SPEC = preset("tiny")


def make_case(dtype=torch.float32, seq=24, batch=2) -> Case:
    ids = torch.randint(0, SPEC.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    return Case(SPEC, ids, 3, dtype, random_weights(SPEC, 0, "typical", torch.float32))


@pytest.fixture(scope="module")
def f32():
    case = make_case()
    return case, truth_and_reference(case)


@pytest.mark.parametrize("name", ["reference", "hf-eager", "hf:eager:grouped_mm", "hf:eager:batched_mm"])
def test_builtin_passes_float32(name, f32):
    case, baseline = f32
    verdict = judge_subject(resolve(name), case, baseline)
    assert verdict.passed, verdict.first_failure
    assert any(c.name == "layers.3.mlp_out" for c in verdict.cells)  # judged point by point


@pytest.fixture(scope="module")
def bf16():
    case = make_case(torch.bfloat16, batch=8)  # 8 rows: a flip leaves out the rest of its row only
    return case, truth_and_reference(case)


@pytest.mark.parametrize("name", ["reference", "hf-eager", "hf:eager:grouped_mm", "hf:eager:batched_mm"])
def test_builtin_passes_bf16(name, bf16):
    case, baseline = bf16
    verdict = judge_subject(resolve(name), case, baseline)
    assert verdict.passed, verdict.first_failure


def test_flipped_tokens_leave_out_later_tokens_of_their_row(bf16):
    """A token routed elsewhere at layer L is left out of its own points after routing at L, and
    every later token of its row from layer L+1 on; other rows are untouched."""
    from gptoss_verify.subjects.judging import flipped_tokens
    from gptoss_verify.subjects.protocol import Output
    case, (truth, ref) = bf16
    points = dict(truth.points)
    idx = points["layers.1.topk_idx"].clone()
    idx[3, 5, 0] = next(e for e in range(SPEC.num_experts) if e not in idx[3, 5].tolist())
    points["layers.1.topk_idx"] = idx
    left_out = flipped_tokens(SPEC.num_layers, case.input_ids.shape, points, truth, None)
    assert not left_out("layers.1.router_logits").any()
    assert left_out("layers.1.mlp_out").nonzero().tolist() == [[3, 5]]
    later = left_out("layers.2.attn_core")
    assert later[3, 5:].all() and not later[3, :5].any() and not later[torch.arange(8) != 3].any()
    assert left_out("logits").sum() == later.sum()


def test_fused_under_interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(SubjectUnavailable, match="TRITON_INTERPRET"):
            resolve("fused").run(make_case(seq=8))
        return
    verdict = judge_subject(resolve("fused"), make_case(seq=16))
    assert verdict.passed, verdict.first_failure


def test_flex_refused_on_cpu():
    with pytest.raises(SubjectUnavailable, match="flex_attention"):
        resolve("hf:flex_attention:eager").run(make_case(seq=8))


def test_openai_torch_skips_cleanly():
    try:
        subject = resolve("openai-torch")
    except SubjectUnavailable as err:
        pytest.skip(str(err))
    from gptoss_verify.formats import canonical
    base = make_case(torch.bfloat16)
    on_grid = dict(canonical.to_mxfp4(base.state.items()))  # its loader reads MXFP4 experts
    case = Case(SPEC, base.input_ids, 0, torch.bfloat16, on_grid)
    verdict = judge_subject(subject, case)
    assert verdict.passed, verdict.first_failure
    # logits only: in bf16 its own routing flips are unknown, so it is judged on the distributions
    assert [c.name for c in verdict.cells] == ["next-token"]
    assert "logits" in verdict.not_judged


class BrokenMLP:
    """Our reference with the expert output halved: every point up to mlp_out of layer 0 is right."""
    name, precisions = "broken", ("float32",)

    def __init__(self):
        self.inner = resolve("reference")
        self.points = self.inner.points

    def run(self, case):
        out = self.inner.run(case)
        bad = dict(out.points)
        bad["layers.0.mlp_out"] = bad["layers.0.mlp_out"] * 0.5
        return type(out)(out.logits, bad)


def test_broken_python_subject_fails_at_its_point(f32, monkeypatch):
    case, baseline = f32
    module = type(sys)("user_engine")
    module.build = BrokenMLP
    monkeypatch.setitem(sys.modules, "user_engine", module)
    verdict = judge_subject(resolve("python:user_engine:build"), case, baseline)
    assert not verdict.passed and verdict.first_failure.name == "layers.0.mlp_out"


def test_python_subject_missing_module():
    with pytest.raises(SubjectUnavailable, match="no_such_engine"):
        resolve("python:no_such_engine:build")


def test_dump_is_judged_with_and_without_routing_points(tmp_path):
    """A dump of our reference's logits and attn_out: judged point by point where it carries topk_idx;
    without, past layer 0's routing only the distributions are judged and the rest is named."""
    from gptoss_verify.subjects.ours import Ours
    case_dir = dumps.export_case(make_case(torch.bfloat16, seq=16), tmp_path / "case", "hf", mxfp4=False, seed=0)
    out = Ours("reference").run(dumps.load_case(case_dir))
    for idx in ("idx", "no-idx"):
        names = ["layers.1.attn_out"] + (["layers.0.topk_idx", "layers.1.topk_idx"] if idx == "idx" else [])
        dump = tmp_path / f"dump-{idx}.safetensors"
        save_file({"logits": out.logits.contiguous(), **{n: out.points[n].contiguous() for n in names}}, str(dump))
        verdict = dumps.judge_dump(case_dir, dump)
        assert verdict.passed, verdict.first_failure
        judged = {c.name for c in verdict.cells}
        if idx == "idx":
            assert judged == {"layers.0.topk_idx", "layers.1.topk_idx", "layers.1.attn_out", "logits", "next-token"}
        else:  # past layer 0's routing its flips cannot be told from errors: named, not judged
            assert judged == {"next-token"} and list(verdict.not_judged) == ["layers.1.attn_out", "logits"]


@pytest.mark.parametrize("tensors, field", [
    ({"x": torch.zeros(1)}, "no 'logits'"),
    ({"logits": torch.zeros(2, 16, 7)}, "logits has shape"),
    ({"logits": torch.zeros(2, 16, 384, dtype=torch.int32)}, "logits has dtype"),
    ({"logits": torch.full((2, 16, 384), float("nan"))}, "logits holds NaN"),
    ({"logits": torch.zeros(2, 16, 384), "layers.0.bogus": torch.zeros(1)}, "layers.0.bogus: not a trace point"),
])
def test_malformed_dump(tmp_path, tensors, field):
    case_dir = dumps.export_case(make_case(torch.bfloat16, seq=16), tmp_path / "case")
    save_file(tensors, str(tmp_path / "dump.safetensors"))
    with pytest.raises(SubjectError, match=field):
        dumps.judge_dump(case_dir, tmp_path / "dump.safetensors")


def test_matrix_writes_reports(tmp_path):
    from gptoss_verify.subjects.matrix import matrix
    data = matrix(["reference", "hf-eager", "hf:flex_attention:eager"], make_case(seq=8), tmp_path, with_probes=False)
    rows = {r["subject"]: r for r in data["rows"]}
    assert rows["reference"]["cells"]["layers.0.q"]["passed"] and rows["reference"]["passed"]
    assert rows["hf:flex_attention:eager"]["status"] == "unavailable" and "CPU" in rows["hf:flex_attention:eager"]["reason"]
    assert {p.name for p in tmp_path.iterdir()} == {"matrix.md", "matrix.json", "matrix.png"}
    text = (tmp_path / "matrix.md").read_text()
    assert "| hf-eager | PASS |" in text and "unavailable: " in text and "![" in text


def test_matrix_marks_a_broken_subject_and_an_error(monkeypatch):
    """A subject with a wrong point fails its row (FAIL in the markdown, the failing cell in the notes);
    one that hands back a malformed answer is an ERROR row, not a crash of the whole matrix."""
    from gptoss_verify.subjects import matrix

    class Malformed:
        name, precisions, points = "malformed", ("float32",), ("logits",)

        def run(self, case):
            return torch.zeros(1)

    class Crashing(Malformed):
        name = "crashing"

        def run(self, case):
            raise RuntimeError("Expected all tensors to be on the same device")

    module = type(sys)("user_engines")
    module.broken, module.malformed, module.crashing = BrokenMLP, Malformed, Crashing
    monkeypatch.setitem(sys.modules, "user_engines", module)
    rows = matrix.run(["python:user_engines:broken", "python:user_engines:malformed", "python:user_engines:crashing"],
                      [make_case(seq=8)], with_probes=False, progress=False)
    assert [(r.status, r.passed) for r in rows] == [("judged", False), ("error", False), ("error", False)]
    assert rows[2].reason == "the subject raised RuntimeError: Expected all tensors to be on the same device"
    text = matrix.to_markdown(matrix.to_json(rows, {}))
    assert "| broken | **FAIL** |" in text and "broken layers.0.mlp_out: FAIL truth" in text
    assert "| malformed | **ERROR**: subject malformed: logits has shape [1]" in text
    with pytest.raises(SubjectError, match="no_such_module"):
        matrix.run(["python:no_such_module:build"], [make_case(seq=8)], with_probes=False, progress=False)
