"""The torch_dist layout: global tensors with layer (and expert) axes, read back bit-exact."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from gptoss_verify.formats import layout
from gptoss_verify.formats.megatron import dist as megatron_dist
from gptoss_verify.formats.megatron import legacy as megatron
from gptoss_verify.formats.errors import CheckpointError


@pytest.mark.parametrize("which,pad", [("tiny", False), ("tiny", True), ("square", True)])
def test_roundtrip(tiny_weights, square_weights, tmp_path, which, pad):
    spec, w = tiny_weights if which == "tiny" else square_weights
    megatron_dist.write(iter(w.items()), spec, tmp_path / "d", tp=2, pad_vocab=pad)
    assert layout.detect(tmp_path / "d") == "megatron-dist"
    got_spec, stream = megatron_dist.read(tmp_path / "d")
    assert got_spec == spec
    got = dict(stream)
    assert sorted(got) == sorted(w)
    for name, t in w.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


def test_global_keys_and_shapes_as_spec_says(tiny_weights, tmp_path):
    spec, w = tiny_weights
    megatron_dist.write(w, spec, tmp_path / "d", tp=2, pad_vocab=True)
    it = tmp_path / "d" / "iter_0000000"
    assert json.loads((it / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert (it / ".metadata").is_file() and (it / "__0_0.distcp").is_file()
    L, E, H, I = spec.num_layers, spec.num_experts, spec.hidden_size, spec.intermediate_size
    rows = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    shapes = {
        "embedding.word_embeddings.weight": (512, H),  # 384 padded for tp=2: ceil(384/256)*256
        "output_layer.weight": (512, H),
        "decoder.final_layernorm.weight": (H,),
        "decoder.layers.self_attention.linear_qkv.weight": (L, rows, H),
        "decoder.layers.self_attention.linear_proj.weight": (L, H, spec.num_heads * spec.head_dim),
        "decoder.layers.self_attention.core_attention.softmax_offset": (L, spec.num_heads),
        "decoder.layers.mlp.experts.experts.linear_fc1.weight": (L, E, 2 * I, H),
        "decoder.layers.mlp.experts.experts.linear_fc2.weight": (L, E, H, I),
    }
    # plain dcp.load of the global tensors, no help from our reader
    state = {k: torch.empty(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(it)), no_dist=True)
    # the same values as the legacy layout at tp=ep=pp=1, stacked along layers and experts
    megatron.write(w, spec, tmp_path / "legacy", pad_vocab=False)
    sd = torch.load(tmp_path / "legacy/iter_0000000/mp_rank_00/model_optim_rng.pt", weights_only=True)["model"]
    for l in range(L):
        assert torch.equal(state["decoder.layers.self_attention.linear_qkv.weight"][l],
                           sd[f"decoder.layers.{l}.self_attention.linear_qkv.weight"])
        for e in range(E):
            assert torch.equal(state["decoder.layers.mlp.experts.experts.linear_fc1.weight"][l, e],
                               sd[f"decoder.layers.{l}.mlp.experts.linear_fc1.weight{e}"])
            assert torch.equal(state["decoder.layers.mlp.experts.experts.linear_fc2.weight"][l, e],
                               w[f"model.layers.{l}.mlp.experts.down_proj"][e].T)
    assert not state["embedding.word_embeddings.weight"][spec.vocab_size:].any()


def test_nonzero_padding_detected(tiny_weights, tmp_path):
    spec, w = tiny_weights
    bad = dict(w)
    megatron_dist.write(bad, spec, tmp_path / "d", tp=2, pad_vocab=True)
    it = tmp_path / "d" / "iter_0000000"
    state = {k: torch.empty(s, dtype=torch.bfloat16) for k, (s, _) in megatron_dist.expected_tensors(spec, tp=2, pad_vocab=True).items()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(it)), no_dist=True)
    state["output_layer.weight"][500] = 1.0
    for f in it.iterdir():
        f.unlink()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(it)), no_dist=True)
    (it / "metadata.json").write_text(json.dumps(megatron_dist.MEGATRON_METADATA))
    with pytest.raises(CheckpointError, match="output_layer.weight: vocabulary padding row 500"):
        dict(megatron_dist.read(tmp_path / "d")[1])


def _evil_metadata(marker) -> bytes:
    """A pickle that would run `os.system("touch MARKER")` if loaded with plain pickle.load."""
    import pickle

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)
    return pickle.dumps(Evil())


def test_a_metadata_pickle_naming_a_forbidden_global_is_refused_not_run(tiny_weights, tmp_path):
    """`.metadata` is a pickle; torch's own reader unpickles it without restriction. Ours refuses any
    global outside the metadata classes, in one error naming the file and the global."""
    spec, w = tiny_weights
    megatron_dist.write(iter(w.items()), spec, tmp_path / "d")
    md = tmp_path / "d" / "iter_0000000" / ".metadata"
    marker = tmp_path / "ran"
    md.write_bytes(_evil_metadata(marker))
    for call in (megatron_dist.read, megatron_dist.list_tensors):
        with pytest.raises(CheckpointError) as info:
            call(tmp_path / "d")
        assert str(md) in str(info.value) and "system is not allowed" in str(info.value), str(info.value)
    assert not marker.exists()


def test_a_metadata_written_by_torchs_own_writer_is_read(tiny_weights, tmp_path):
    """The allow-list covers what torch's FileSystemWriter stores (StorageMeta with the path and save
    id included), so checkpoints that other programs wrote with torch load; and ours leaves the
    StorageMeta out, so two writes are byte-identical."""
    from gptoss_verify.formats.megatron.dist_metadata import load_metadata
    spec, w = tiny_weights
    megatron_dist.write(iter(w.items()), spec, tmp_path / "a")
    megatron_dist.write(iter(w.items()), spec, tmp_path / "b")
    a, b = (tmp_path / x / "iter_0000000" / ".metadata" for x in "ab")
    assert a.read_bytes() == b.read_bytes()
    state = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "plain")), no_dist=True)
    md = load_metadata(tmp_path / "plain" / ".metadata")
    assert md.storage_meta.save_id and list(md.state_dict_metadata["x"].size) == [2, 3]
