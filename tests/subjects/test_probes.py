"""Feature probes from logits alone: every zoo fault, run as a third-party subject that hands back
logits only, is named by the probe of its own feature and by no other; ours, fused and
transformers' pass every probe; a subject without a KV cache is told the decode probe does not apply."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from gptoss_verify.backends import block_functions
from gptoss_verify.model import Transformer
from gptoss_verify.model.attention import LayerCache
from gptoss_verify.model.faults import FAULTS
from gptoss_verify.subjects import probes
from gptoss_verify.subjects.ours import Ours
from gptoss_verify.subjects.registry import resolve

# fault -> the feature that must be named (written here from what each fault breaks, not read off
# the probes' output); the dtype where the fault exists (norm-cast-first is a no-op in float32)
EXPECTED = {
    "window-129": (probes.WINDOW, torch.float32),
    "window-127": (probes.WINDOW, torch.float32),
    "sink-scaled": (probes.SINKS, torch.float32),
    "sink-dropped": (probes.SINKS, torch.float32),
    "sink-no-max": (probes.SINKS, torch.float32),
    "yarn-truncate": (probes.YARN_F, torch.float32),
    "yarn-no-concentration": (probes.YARN_F, torch.float32),
    "rope-interleaved": (probes.ROPE, torch.float32),
    "gate-clamp-symmetric": (probes.CLAMP, torch.float32),
    "gate-up-halves": ("SwiGLU gate/up interleave (even gate, odd up)", torch.float32),
    "router-softmax-all": ("router: top-k, then softmax over the k", torch.float32),
    "norm-cast-first": ("RMSNorm cast order (weight times normalised in float32, one rounding)", torch.bfloat16),
    "norm-eps-1e-6": ("RMSNorm eps", torch.float32),
    "down-bias-after-weight": ("expert biases (gate_up, down inside the weighted sum)", torch.float32),
}


class LogitsOnly:
    """Someone else's engine: our reference with one zoo fault, logits only, no KV cache."""
    precisions = ("float32", "bfloat16")
    points = ("logits",)

    def __init__(self, fault: str):
        self.fault = fault
        self.name = f"engine-with-{fault}"

    def run(self, case):
        model = Transformer.from_state_dict(case.spec, case.dense_state(), block_functions("reference", [self.fault]))
        with torch.no_grad():
            return model(case.input_ids, case.offset)


def test_every_fault_has_an_expected_feature():
    assert set(EXPECTED) == set(FAULTS)
    assert {f for f, _ in EXPECTED.values()} <= {p.feature for p in probes.PROBES.values()}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_zoo_fault_is_named_by_its_feature_alone(fault):
    feature, dtype = EXPECTED[fault]
    results = probes.run_probes(LogitsOnly(fault), dtype)
    failed = probes.failing_features(results)
    assert failed == {feature}, f"{fault}: failing {[str(r) for r in results if not r.passed]}"
    assert [r for r in results if r.name == "decode"][0].applicable is False  # no decode: stated, not failed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_reference_passes_every_probe(dtype):
    results = probes.run_probes(resolve("reference"), dtype)
    assert all(r.passed for r in results), [str(r) for r in results if not r.passed]
    applicable = {r.name for r in results if r.applicable}
    # the cast order exists only below float32; every other probe says something in every dtype
    assert applicable == set(probes.PROBES) - ({"norm-cast-order"} if dtype in (torch.float32, torch.float64) else set())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_eager_passes_every_probe(dtype):
    pytest.importorskip("transformers")
    results = probes.run_probes(resolve("hf-eager"), dtype)
    assert all(r.passed for r in results), [str(r) for r in results if not r.passed]
    assert {r.name for r in results if not r.applicable} <= {"decode", "norm-cast-order"}


def test_fused_passes_every_probe():
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("fused on the CPU needs TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    results = probes.run_probes(resolve("fused"), torch.float32)
    assert all(r.passed for r in results), [str(r) for r in results if not r.passed]
    assert [r for r in results if r.name == "decode"][0].applicable  # its KV cache decodes as it prefills


class OwnMXFP4Decoder:
    """An engine that decodes the state's MXFP4 experts itself, with the scale bias it is given
    (127 is right; compressed-tensors #538 stored scales with 125)."""
    precisions = ("float32", "bfloat16")
    points = ("logits",)

    def __init__(self, bias: int):
        self.bias, self.name = bias, f"mxfp4-bias-{bias}"

    def run(self, case):
        from gptoss_verify.formats.mxfp4 import FP4_VALUES
        lut = torch.tensor(FP4_VALUES, dtype=torch.float64)
        dense = {}
        for name, t in case.state.items():
            if name.endswith("_scales"):
                continue
            if name.endswith("_blocks"):
                s = case.state[name[:-len("_blocks")] + "_scales"].to(torch.int64)
                b = t.to(torch.int64)
                vals = torch.stack((lut[b & 15], lut[b >> 4]), -1).flatten(-2)  # [E, out, G, 32]
                w = (vals * torch.exp2((s - self.bias).double())[..., None]).flatten(-2)
                dense[name[:-len("_blocks")]] = w.transpose(-1, -2).to(case.dtype)
            else:
                dense[name] = t.to(case.dtype)
        model = Transformer.from_state_dict(case.spec, dense)
        with torch.no_grad():
            return model(case.input_ids, case.offset)


def test_mxfp4_probe_names_a_wrong_scale_bias_and_passes_a_right_decoder():
    right = probes.run_probes(OwnMXFP4Decoder(127), torch.float32)
    assert all(r.passed for r in right), [str(r) for r in right if not r.passed]
    wrong = probes.run_probes(OwnMXFP4Decoder(125), torch.float32)
    assert probes.failing_features(wrong) == {"MXFP4 decoding"}


def test_mxfp4_probe_covers_every_scale_and_code():
    case = probes.probe_case("mxfp4", torch.bfloat16).case
    scales = case.state["model.layers.0.mlp.experts.down_proj_scales"]
    assert sorted(set(scales.flatten().tolist())) == [s + 127 for s in range(-8, 128)]
    blocks = case.state["model.layers.0.mlp.experts.down_proj_blocks"]
    assert set((blocks & 15).flatten().tolist()) | set((blocks >> 4).flatten().tolist()) == set(range(16))
    dense = case.dense_state()["model.layers.0.mlp.experts.down_proj"]
    assert torch.isfinite(dense).all()


def test_hf_mxfp4_checkpoint_passes_the_mxfp4_probe():
    pytest.importorskip("transformers")
    result = probes.run_probe(resolve("hf-mxfp4"), "mxfp4", torch.bfloat16)
    assert result.applicable and result.passed, str(result)


class ShortCache(Ours):
    """Our reference whose sliding layers' KV cache keeps one key too few (W − 2)."""

    def decode(self, case, prefill):
        model = self._model(case)
        original = model.new_cache
        model.new_cache = lambda: [LayerCache(None if c.window is None else c.window - 1) for c in original()]
        cache, ids, parts = model.new_cache(), case.input_ids, []
        with torch.no_grad():
            parts.append(model(ids[:, :prefill], case.offset, cache))
            for t in range(prefill, ids.shape[1]):
                parts.append(model(ids[:, t:t + 1], case.offset + t, cache))
        return torch.cat(parts, 1)


def test_decode_probe_names_a_short_cache():
    results = probes.run_probes(ShortCache("reference"), torch.float32)
    assert probes.failing_features(results) == {"KV-cache decode"}


def test_nan_logits_fail_the_probe_with_the_reason():
    result = probes.run_probe(LogitsOnly("sink-no-max"), "sinks-large", torch.bfloat16)
    assert not result.passed and result.error == float("inf") and "NaN" in result.note


def test_matrix_row_names_the_feature():
    from gptoss_verify.config import preset
    from gptoss_verify.subjects.matrix import judge_row, to_json, to_markdown
    from gptoss_verify.subjects.protocol import Case
    case = Case.random(preset("tiny"), torch.float32, batch=2, seq=8)
    row = judge_row(LogitsOnly("window-129"), case)
    text = to_markdown(to_json([row], {}))
    assert "probe window-long: FAIL — the feature at fault: sliding window" in text
    assert "probes not applicable" in text and "decode" in text
    assert dataclasses.asdict(row.probes[0])["name"] == "sinks-small"
