"""Writing every rank file at once: which ranks share bytes, and the fan-out writer's failure paths."""
from __future__ import annotations

import threading
import zipfile

import pytest
import torch

from gptoss_verify.formats.megatron import legacy as megatron
from gptoss_verify.formats.megatron.files import Layout
from gptoss_verify.formats.errors import CheckpointError
from gptoss_verify.formats.fileio.fanout_writer import FanOutWriter
from gptoss_verify.formats.megatron.source import MappingSource
from gptoss_verify.formats.fileio.torch_save_file import StreamingTorchFile


@pytest.mark.parametrize("tp,ep,pp", [(2, 2, 1), (4, 2, 2)])
def test_copy_keys_name_exactly_the_ranks_with_equal_bytes(tiny_weights, tp, ep, pp):
    """The writer builds a tensor once per `copy_key` and writes it to every rank with that key:
    ranks with equal keys must hold bit-equal tensors, ranks with different keys different ones
    (the random weights make every tensor-parallel piece and every expert distinct)."""
    spec, weights = tiny_weights
    lay = Layout(tp, ep, pp)
    src = MappingSource(weights)
    for s in range(pp):
        plans = {(t, p): megatron.rank_plan(spec, lay, t, s, p) for t in range(tp) for p in range(ep)}
        for name in plans[(0, 0)]:
            built = {(t, p): plan[name].recipe(src) for (t, p), plan in plans.items()}
            for a in built:
                for b in built:
                    same_key = plans[a][name].copy_key(*a) == plans[b][name].copy_key(*b)
                    assert torch.equal(built[a], built[b]) == same_key, (name, a, b)


def _file(path, n=3, shape=(4, 5)):
    entries = [(f"t{i}", shape, torch.float32) for i in range(n)]
    return StreamingTorchFile(path, entries, lambda refs: {"model": refs})


def test_each_copy_is_written_and_loads(tmp_path):
    w = FanOutWriter(budget=1 << 20)
    for k in "ab":
        w.add(k, _file(tmp_path / f"{k}.pt"))
    tensors = {f"t{i}": torch.randn(4, 5) for i in range(3)}
    w.put(["a", "b"], "t0", tensors["t0"])
    w.put(["a"], "t1", tensors["t1"])
    w.put(["b"], "t1", -tensors["t1"])
    w.put(["b", "a"], "t2", tensors["t2"])
    w.close()
    a = torch.load(tmp_path / "a.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["model"]
    for name in ("t0", "t2"):
        assert torch.equal(a[name], tensors[name]) and torch.equal(b[name], tensors[name])
    assert torch.equal(a["t1"], tensors["t1"]) and torch.equal(b["t1"], -tensors["t1"])
    for k in "ab":  # the CRC computed once per tensor is each record's CRC (torch.load does not check it)
        with zipfile.ZipFile(tmp_path / f"{k}.pt") as z:
            assert z.testzip() is None


def test_a_writer_error_reaches_the_producer_and_nothing_is_left(tmp_path):
    w = FanOutWriter(budget=1 << 20)
    for k in "ab":
        w.add(k, _file(tmp_path / f"{k}.pt"))
    w.put(["a", "b"], "t0", torch.zeros(4, 5))
    w.put(["a", "b"], "t1", torch.zeros(3, 5))  # misshaped: the writer threads refuse it
    with pytest.raises(CheckpointError, match=r"tensor t1: expected torch.float32 \[4, 5\], got torch.float32 \[3, 5\]"):
        w.put(["a", "b"], "t2", torch.zeros(4, 5))
        w.close()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_missing_tensor_fails_close_and_removes_every_file(tmp_path):
    w = FanOutWriter(budget=1 << 20)
    for k in "ab":
        w.add(k, _file(tmp_path / f"{k}.pt", n=2))
    w.put(["a", "b"], "t0", torch.zeros(4, 5))
    with pytest.raises(CheckpointError, match="tensor t1 was never written"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_queued_bytes_stay_within_the_budget(tmp_path, monkeypatch):
    """The producer waits while the writers are behind: with writes held back, a second tensor
    that would exceed the budget is not queued until the first one is written everywhere."""
    gate = threading.Event()
    real_put = StreamingTorchFile.put

    def slow_put(self, *args, **kwargs):
        gate.wait(10)
        return real_put(self, *args, **kwargs)

    monkeypatch.setattr(StreamingTorchFile, "put", slow_put)
    w = FanOutWriter(budget=4 * 5 * 4)  # one tensor
    for k in "ab":
        w.add(k, _file(tmp_path / f"{k}.pt", n=2))
    w.put(["a", "b"], "t0", torch.zeros(4, 5))
    second = threading.Thread(target=w.put, args=(["a", "b"], "t1", torch.ones(4, 5)))
    second.start()
    second.join(0.3)
    assert second.is_alive() and w._pending == 80, "the second tensor was queued past the budget"
    gate.set()
    second.join(10)
    assert not second.is_alive()
    w.close()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["model"]["t1"], torch.ones(4, 5))
