"""Our torch_dist output (`convert --to megatron-dist`) as megatron-core reads and writes it:
`dist_checkpointing.load` with its default strictness accepts it (common state and every
`_extra_state` object present), the model computes our model from it, megatron-core's own
`dist_checkpointing.save` of that model holds bit-identical tensors, and our reader reads its
save back to bit-identical canonical tensors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("megatron.core")

import torch.distributed.checkpoint as dcp  # noqa: E402

from gptoss_verify.formats.megatron import dist, files, mapping  # noqa: E402
from gptoss_verify.subjects.megatron_core import MegatronCore, ranks  # noqa: E402

from .conftest import SPEC, case  # noqa: E402
from .test_subject import assert_parity  # noqa: E402


def _tensors(iter_dir) -> dict[str, torch.Tensor]:
    md = dcp.FileSystemReader(str(iter_dir)).read_metadata()
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
             if isinstance(v, dcp.metadata.TensorStorageMetadata)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(iter_dir)), no_dist=True)
    return state


def test_loads_with_default_strictness_and_matches_megatron_cores_own_save(tmp_path):
    c = case(torch.float32, seed=4)
    ours = tmp_path / "ours"
    dist.write(c.dense_state(), SPEC, ours)
    theirs = tmp_path / "theirs"
    iter_dir = theirs / f"iter_{files.ITERATION:07d}"
    subject = MegatronCore(layout="megatron-dist")
    job = ranks.Job(str(ours), "float32", save_to=str(iter_dir))
    (trace,), _, _ = ranks.run([job], c.input_ids)  # dist_checkpointing.load, then save
    from gptoss_verify.subjects.protocol import Output
    assert_parity(subject, c, Output(trace.pop("logits"), trace))
    a, b = _tensors(ours / f"iter_{files.ITERATION:07d}"), _tensors(iter_dir)
    assert len(b) == len(mapping.ROWS)  # megatron-core's local spec saves one key per row
    for key, t in b.items():
        assert torch.equal(a[key], t), key  # its keys (the local alias among them) are all ours, bit-equal
    # and our reader reads megatron-core's own save (given our sidecar for the spec) to the same tensors
    shutil.copy(ours / files.SIDECAR, theirs / files.SIDECAR)
    (theirs / files.TRACKER).write_text(f"{files.ITERATION}\n")
    (iter_dir / "metadata.json").write_text(json.dumps(dist.MEGATRON_METADATA))
    _, mine = dist.read(ours)
    _, back = dist.read(theirs)
    mine = dict(mine)
    for name, t in back:
        assert torch.equal(mine.pop(name), t), name
    assert not mine


def test_float64_without_common_pt(tmp_path):
    """megatron-core >= 0.17 reads the common state from the distcp object alone (common.pt is for
    0.16); float64 parity through dist_checkpointing.load, the router floor stated."""
    from gptoss_verify.subjects.protocol import Output
    c = case(torch.float64, seed=5)
    ours = tmp_path / "ours"
    dist.write(c.dense_state(), SPEC, ours)
    (ours / f"iter_{files.ITERATION:07d}" / dist.COMMON_FILE).unlink()
    (trace,), _, _ = ranks.run([ranks.Job(str(ours), "float64")], c.input_ids)
    assert_parity(MegatronCore(layout="megatron-dist"), c, Output(trace.pop("logits"), trace))


def test_megatron_core_refuses_it_without_the_extra_state_objects(tmp_path, monkeypatch):
    """The objects are what its default strictness asks for: without them the load fails, naming one."""
    c = case(torch.float32, seed=6)
    monkeypatch.setattr(dist.mapping, "extra_state_keys", lambda: {})
    ours = tmp_path / "ours"
    dist.write(c.dense_state(), SPEC, ours)
    with pytest.raises(ValueError, match="_extra_state"):
        ranks.run([ranks.Job(str(ours), "float32")], c.input_ids)
