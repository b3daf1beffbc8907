"""`--stream-layers`: one decoder layer's weights at a time gives exactly the whole-model results."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gptoss_verify.cli import main
from gptoss_verify.config import preset
from gptoss_verify.model import Transformer
from gptoss_verify.parity import streaming
from gptoss_verify.parity.run import ParityCase, run_case
from gptoss_verify.weights import random_weights

TINY = preset("tiny")


def _same(a: float, b: float) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _assert_identical(whole, streamed) -> None:
    assert [(r.mode, r.name, r.kind) for r in streamed.rows] == [(r.mode, r.name, r.kind) for r in whole.rows]
    for w, s in zip(whole.rows, streamed.rows):
        for field in dataclasses.fields(w):
            assert _same(getattr(w, field.name), getattr(s, field.name)), (w.mode, w.name, field.name)
    for attr in ("clamp_share", "router_ties", "routing_agreement", "argmax_agreement", "kl_ours",
                 "tie_tokens_excluded"):
        assert _same(getattr(whole, attr), getattr(streamed, attr)), attr


@pytest.mark.parametrize("dtype,profile", [(torch.float64, "typical"), (torch.bfloat16, "stress")], ids=str)
def test_streamed_random_weights_equal_whole_model(dtype, profile):
    case = ParityCase(TINY, dtype, profile, 0, 2, 40, 4090)
    whole = run_case(case)
    streamed = run_case(dataclasses.replace(case, stream_layers=True))
    assert streamed.passed and whole.passed
    _assert_identical(whole, streamed)
    drawn = [k for k in streamed.phases if k.startswith("of which drawing")]
    assert drawn and int(drawn[0].split()[3]) >= 4 * TINY.num_layers  # oracle, ours, teacher-forced, clamp share


def test_streamed_state_equals_whole_state():
    """A given state dict (a checkpoint's) is streamed from memory: the same results again."""
    state = random_weights(TINY, 3, "typical", torch.float32)
    case = ParityCase(TINY, torch.bfloat16, "typical", 3, 1, 24, 0)
    _assert_identical(run_case(case, state), run_case(dataclasses.replace(case, stream_layers=True), state))


def test_one_layer_resident_at_a_time():
    """While a layer runs, every other layer of the model is on `meta`; after the forward, all are."""
    spec = TINY
    whole_state = random_weights(spec, 0, "typical", torch.float32)
    stream = streaming.LayerWeights(spec, streaming.random_source(spec, 0, "typical", torch.float32, "cpu"))
    model = Transformer.from_state_dict(
        spec, streaming.meta_layers(spec, {n: whole_state[n] for n in streaming.RESIDENT}, torch.float32))
    stream.attach(model.model.layers)
    seen = []

    def check(module, args, i):  # a pre-hook, run after the stream's own (registered first)
        resident = [j for j, layer in enumerate(model.model.layers)
                    if not all(p.is_meta for p in layer.parameters())]
        seen.append((i, resident))

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: check(m, a, i))
    ids = torch.randint(0, spec.vocab_size, (1, 20))
    with torch.no_grad():
        streamed = model(ids)
        whole = Transformer.from_state_dict(spec, whole_state)(ids)
    assert seen == [(i, [i]) for i in range(spec.num_layers)]
    assert all(p.is_meta for layer in model.model.layers for p in layer.parameters())
    assert torch.equal(streamed, whole)


def test_cli_stream_layers(tmp_path):
    report = tmp_path / "p.md"
    assert main(["parity", "--stream-layers", "--layers", "2", "--dtype", "bfloat16", "--profile", "typical",
                 "--seq", "8", "--batch", "1", "--report", str(report)]) == 0
    assert "streamed one decoder layer at a time" in report.read_text()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_streamed_parity_on_cuda(backend):
    """On the GPU the layer tensors are drawn on the device; the streamed run passes with both backends
    (bitwise equality with the whole model is the CPU test's: CUDA's atomics may reorder sums)."""
    case = ParityCase(TINY, torch.bfloat16, "stress", 0, 2, 40, 4090, device="cuda", backend=backend,
                      stream_layers=True)
    result = run_case(case)
    fd = result.first_divergence
    assert result.passed, f"{fd.name} {fd.kind} {fd.measure:.3g} > {fd.bound:.3g}"
    assert torch.cuda.memory_allocated() < 64 << 20  # nothing of the layers left behind
