"""`golden regenerate` killed anywhere (issue 18 items 1-2). The goldens are a folder of files
updated file by file (each one renamed into place whole, the manifest last), so after a kill every
file is the old one or the new one, whole; `load_manifest` then passes or refuses the mix by sha256
(one GoldenError); the next regenerate removes the dead run's scratch folder and writes the same
bytes as an uninterrupted run. The oracle is replaced by a fixed cheap one: the writing is what is
under test, and the forked writer must reach its renames in milliseconds."""
from __future__ import annotations

import zlib

import pytest
import torch

from gptoss_verify import golden
from gptoss_verify.trace import Trace

from .conftest import leftovers, tree_hashes
from .faults import Faults, installed, run_forked
from .test_kill import record

CASES = golden.CASES[:3]


_SALT = {"version": ""}


def fake_oracle(case):
    """Fixed outputs per (case, version being written), so old and new goldens differ."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case.name} {_SALT['version']}".encode()))
    trace = Trace()
    trace.record("embed", torch.randn(2, 3, 4, generator=gen))
    return torch.randn(case.batch, case.seq, 8, generator=gen), trace


@pytest.fixture()
def cheap_oracle(monkeypatch):
    monkeypatch.setattr(golden, "_oracle_outputs", fake_oracle)


def test_golden_regenerate_killed_anywhere(cheap_oracle, tmp_path):
    def regenerate(out, version):
        _SALT["version"] = version
        golden._regenerate(out, CASES, version)
        return 0

    ref_parent = tmp_path / "ref"
    faults = Faults(ref_parent)
    ref_parent.mkdir()
    with installed(faults):
        regenerate(ref_parent / "g", "new")
    ref, events = tree_hashes(ref_parent / "g"), faults.events
    old_dir = tmp_path / "old"
    regenerate(old_dir / "g", "old")
    old = tree_hashes(old_dir / "g")
    assert all(old[k] != ref[k] for k in ref)
    outcomes = {"old": 0, "new": 0, "mixed (refused by sha256)": 0}
    for at in range(len(events)):
        parent = tmp_path / f"k{at}"
        parent.mkdir()
        out = parent / "g"
        regenerate(out, "old")
        code = run_forked(lambda: regenerate(out, "new"), Faults(parent, at, mid_write=at % 2 == 1))
        assert code == -9, f"kill at event {at} {events[at]}: exit {code}"
        state = {k: v for k, v in tree_hashes(out).items() if ".partial-" not in k}
        assert all(state.get(k) in (old.get(k), ref.get(k)) for k in set(state) | set(ref)), \
            f"kill at event {at}: a golden file is neither the old nor the new one"
        try:
            golden.load_manifest(out)
            outcomes["old" if state == old else "new"] += 1
        except golden.GoldenError:
            outcomes["mixed (refused by sha256)"] += 1
        regenerate(out, "new")
        assert leftovers(out, set(ref)) == [], f"kill at event {at}: a partial survived the rerun"
        assert tree_hashes(out) == ref
    record("kill-golden", {"layout": "golden regenerate", "events": len(events), "points": len(events), **outcomes})
