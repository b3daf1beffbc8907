"""HF canonical -> Megatron legacy files -> read back from disk: bit-exact over the TP x EP x PP grid."""
from __future__ import annotations

import itertools

import pytest
import torch

from gptoss_verify.formats import canonical
from gptoss_verify.formats.megatron import legacy as megatron
from gptoss_verify.formats.errors import CheckpointError


def _assert_same(spec, weights, out):
    got_spec, stream = megatron.read(out)
    assert got_spec == spec
    seen = []
    for name, t in stream:
        ref = weights[name]
        assert t.dtype == ref.dtype and t.shape == ref.shape, name
        assert torch.equal(t.contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8)), f"{name} differs"
        seen.append(name)
    assert sorted(seen) == sorted(weights) and len(seen) == len(set(seen))


GRID = list(itertools.product((1, 2, 4), (1, 2, 4), (1, 2)))


@pytest.mark.parametrize("tp,ep,pp", GRID)
def test_roundtrip_non_square(tiny_weights, tmp_path, tp, ep, pp):
    spec, weights = tiny_weights
    megatron.write(weights, spec, tmp_path / "mg", tp=tp, ep=ep, pp=pp, pad_vocab=(tp + ep) % 2 == 1)
    _assert_same(spec, weights, tmp_path / "mg")


@pytest.mark.parametrize("tp,ep,pp", [(1, 1, 1), (2, 2, 2), (4, 4, 1), (4, 1, 2)])
def test_roundtrip_square(square_weights, tmp_path, tp, ep, pp):
    spec, weights = square_weights
    assert spec.hidden_size == spec.intermediate_size
    megatron.write(iter(weights.items()), spec, tmp_path / "mg", tp=tp, ep=ep, pp=pp, pad_vocab=True)
    _assert_same(spec, weights, tmp_path / "mg")


def test_one_shot_stream_and_mxfp4_source(tiny_weights, tmp_path):
    """A one-shot iterator with MXFP4 experts is spooled and decoded: the files equal those written
    from the exactly decoded dense weights."""
    spec, weights = tiny_weights
    mx = list(canonical.to_mxfp4(iter(weights.items())))
    dense = dict(canonical.to_dense(iter(mx)))
    megatron.write(iter(mx), spec, tmp_path / "a", tp=2, ep=2, pp=2)
    megatron.write(dense, spec, tmp_path / "b", tp=2, ep=2, pp=2)
    a, b = dict(megatron.iter_stored(tmp_path / "a")), dict(megatron.iter_stored(tmp_path / "b"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    _assert_same(spec, dense, tmp_path / "a")


def test_files_and_names(tiny_weights, tmp_path):
    spec, weights = tiny_weights
    megatron.write(weights, spec, tmp_path / "mg", tp=2, ep=2, pp=2, pad_vocab=True)
    root = tmp_path / "mg"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    dirs = sorted(p.name for p in (root / "iter_0000000").iterdir())
    # Megatron-LM get_checkpoint_name: mp_rank_{tp:02d}_{pp:03d}_{ep:03d}
    assert dirs == [f"mp_rank_{t:02d}_{s:03d}_{p:03d}" for t in range(2) for s in range(2) for p in range(2)]
    obj = torch.load(root / "iter_0000000/mp_rank_01_001_001/model_optim_rng.pt", weights_only=True)
    assert obj["checkpoint_version"] == 3.0 and obj["iteration"] == 0
    sd = obj["model"]
    assert "embedding.word_embeddings.weight" not in sd  # stage 1 of 2
    assert sd["output_layer.weight"].shape == (256, spec.hidden_size)  # padded 384 -> 512, half of it
    assert "decoder.layers.0.mlp.experts.linear_fc1.weight3" in sd  # 8 experts over ep=2: local 0..3
    assert "decoder.layers.0.mlp.experts.linear_fc1.weight4" not in sd
    assert "decoder.layers.1.mlp.router.bias" not in sd  # local numbering: stage 1 holds global layer 1 as 0
    table = megatron.expected_tensors(spec, tp=2, ep=2, pp=2, pad_vocab=True)
    key = "mp_rank_01_001_001/decoder.layers.0.self_attention.linear_qkv.weight"
    assert table[key] == (((4 // 2) * (2 + 2) * 16, 64), torch.bfloat16)


def test_single_suffix_names(tiny_weights, tmp_path):
    spec, weights = tiny_weights
    megatron.write(weights, spec, tmp_path / "pp", tp=2, pp=2)
    megatron.write(weights, spec, tmp_path / "ep", tp=2, ep=2)
    assert sorted(p.name for p in (tmp_path / "pp/iter_0000000").iterdir())[:2] == ["mp_rank_00_000", "mp_rank_00_001"]
    for d in ("pp", "ep"):  # without the sidecar, the one extra number is told apart by the files' content
        (tmp_path / d / megatron.SIDECAR).rename(tmp_path / d / "sidecar.bak")
        (tmp_path / d / "config.json").write_text(__import__("json").dumps(spec.to_hf_config()))
        lay = megatron.open_checkpoint(tmp_path / d).layout
        assert (lay.tp, lay.ep, lay.pp) == ((2, 1, 2) if d == "pp" else (2, 2, 1))
        _assert_same(spec.replace(name=(tmp_path / d).name), weights, tmp_path / d)


@pytest.mark.parametrize("opt,value,needle", [("tp", 3, "tp=3"), ("ep", 3, "ep=3"), ("pp", 3, "pp=3"),
                                              ("tp", 8, "tp=8"), ("tp", 0, "tp")])
def test_bad_sizes_refused(tiny_weights, tmp_path, opt, value, needle):
    spec, weights = tiny_weights
    with pytest.raises(CheckpointError, match=needle):
        megatron.write(weights, spec, tmp_path / "mg", **{opt: value})
    assert not (tmp_path / "mg").exists()
    assert not list(tmp_path.iterdir())  # no temporary left behind
