"""Reading is strict: each problem is one error naming the file and the tensor."""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.formats.megatron import legacy as megatron
from gptoss_verify.formats.errors import CheckpointError


def _tamper(path, fn):
    obj = torch.load(path, weights_only=True)
    fn(obj["model"])
    torch.save(obj, path)


@pytest.fixture
def written(tiny_weights, tmp_path):
    spec, w = tiny_weights
    root = tmp_path / "mg"
    megatron.write(w, spec, root, tp=2, ep=2, pp=1, pad_vocab=True)
    return spec, w, root


def _file(root, name):
    return root / "iter_0000000" / name / "model_optim_rng.pt"


def _drain(root):
    spec, stream = megatron.read(root)
    for _ in stream:
        pass


def test_nonzero_padding_row_detected(written):
    spec, w, root = written
    f = _file(root, "mp_rank_01_000")
    _tamper(f, lambda sd: sd["embedding.word_embeddings.weight"][-1].fill_(1.0))
    _tamper(_file(root, "mp_rank_01_001"), lambda sd: sd["embedding.word_embeddings.weight"][-1].fill_(1.0))
    with pytest.raises(CheckpointError, match=r"mp_rank_01_00\d.*embedding.word_embeddings.weight.*padding row 511"):
        _drain(root)


def test_missing_tensor(written):
    _, _, root = written
    f = _file(root, "mp_rank_00_001")
    _tamper(f, lambda sd: sd.pop("decoder.layers.1.mlp.experts.linear_fc2.bias2"))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_001.*missing tensor decoder.layers.1.mlp.experts.linear_fc2.bias2"):
        megatron.read(root)


def test_unexpected_tensor(written):
    _, _, root = written
    f = _file(root, "mp_rank_00_000")
    _tamper(f, lambda sd: sd.__setitem__("decoder.layers.0.mlp.shared_experts.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_000.*unexpected tensor decoder.layers.0.mlp.shared_experts.weight"):
        megatron.read(root)


def test_wrong_shape(written):
    _, _, root = written
    f = _file(root, "mp_rank_01_000")
    name = "decoder.layers.0.mlp.experts.linear_fc2.weight0"  # [H, I] = [64, 96]: transposed is [96, 64]
    _tamper(f, lambda sd: sd.__setitem__(name, sd[name].T.contiguous()))
    with pytest.raises(CheckpointError, match=r"mp_rank_01_000.*linear_fc2.weight0: expected .*\[64, 96\], got .*\[96, 64\]"):
        megatron.read(root)


def test_replicated_copies_must_be_bit_equal(written):
    _, _, root = written
    f = _file(root, "mp_rank_01_001")
    _tamper(f, lambda sd: sd["decoder.layers.1.mlp.router.bias"].__setitem__(0, 123.0))
    with pytest.raises(CheckpointError, match=r"mp_rank_01_001.*decoder.layers.1.mlp.router.bias differs"):
        _drain(root)


def test_expert_copies_over_tp_must_be_bit_equal(written):
    _, _, root = written
    f = _file(root, "mp_rank_01_001")
    _tamper(f, lambda sd: sd["decoder.layers.0.mlp.experts.linear_fc1.weight1"].neg_())
    with pytest.raises(CheckpointError, match=r"linear_fc1.weight1 differs"):
        _drain(root)


def test_sequential_mlp_spelling_and_extra_state_accepted(written):
    spec, w, root = written

    def respell(sd):
        for name in [n for n in sd if ".mlp.experts.linear_fc" in n]:
            stem, kind = name.rsplit(".", 1)  # ...linear_fc1.weight3
            field = kind.rstrip("0123456789")
            k = kind[len(field):]
            base, fc = stem.rsplit(".", 1)
            sd[f"{base}.local_experts.{k}.{fc}.{field}"] = sd.pop(name)
        sd["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
    for d in ("mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"):
        _tamper(_file(root, d), respell)
    _, stream = megatron.read(root)
    got = dict(stream)
    for name, t in w.items():
        assert torch.equal(got[name], t), name


def test_load_rank_reads_its_file_only(written, monkeypatch):
    spec, w, root = written
    import gptoss_verify.formats.megatron.legacy as m
    opened = []
    real = m.index
    monkeypatch.setattr(m, "index", lambda path: opened.append(str(path)) or real(path))
    meta, sd = megatron.load_rank(root, tp_rank=1, ep_rank=0, pp_rank=0)
    assert opened == [str(_file(root, "mp_rank_01_000"))]
    assert meta["spec"] == spec and (meta["layout"].tp, meta["layout"].ep) == (2, 2)
    assert sd["decoder.layers.0.self_attention.core_attention.softmax_offset"].shape == (spec.num_heads // 2,)


def test_detect(written, tmp_path):
    _, _, root = written
    assert megatron.detect(root)
    assert megatron.detect(root / "iter_0000000")
    assert not megatron.detect(tmp_path / "nothing") if (tmp_path / "nothing").mkdir() is None else True
