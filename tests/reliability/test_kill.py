"""Kill the writer anywhere (issue 18 item 2): for each layout we write, SIGKILL the writing process
at >= 20 points spread over its filesystem events (bytes written included: every other kill lands
half-way through a write), the commit rename and the step after it among them. After each kill: the
destination is absent or complete and byte-identical to an uninterrupted run, the source is
unchanged, and a rerun into the same folder succeeds, removes the dead run's partial and writes the
same bytes (torch_dist included: its `.metadata` carries no random save id, dist_metadata.py). The
figures of docs/reliability.md come from the records these tests write."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import THOROUGH, leftovers, tree_hashes
from .faults import Faults, installed, run_forked
from .writers import WRITERS, write

POINTS = 60 if THOROUGH else 22
FIGURES = os.environ.get("GPTOSS_RELIABILITY_FIGURES")  # a folder: each test writes its outcomes there


def record(name: str, data: dict) -> None:
    if FIGURES:
        Path(FIGURES).mkdir(parents=True, exist_ok=True)
        (Path(FIGURES) / f"{name}.json").write_text(json.dumps(data, indent=1))


def reference(layout, src, tmp_path):
    """An uninterrupted run (in this process, so the forked runs after it start warm; events
    counted, none injected): its tree and its events."""
    parent = tmp_path / "ref"
    parent.mkdir()
    faults = Faults(parent)
    with installed(faults):
        assert write(layout, src, parent / "out") == 0
    assert leftovers(parent) == ["out"]
    return tree_hashes(parent / "out"), faults.events


def kill_points(events, n: int) -> list[int]:
    """`n` event numbers spread evenly over the run, plus the commit rename (the last rename onto
    the destination) and the event after it."""
    last = len(events) - 1
    spread = {round(i * last / (n - 1)) for i in range(n)}
    commits = [i for i, (kind, path, _) in enumerate(events) if kind == "rename" and ".out.partial-" in path
               and "/" not in path.split(".out.partial-")[-1]]
    assert commits, "the writer never renamed its partial onto the destination"
    return sorted(spread | {commits[-1], min(commits[-1] + 1, last)})


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_killed_anywhere_ends_clean(layout, small_mxfp4, tmp_path):
    src = small_mxfp4
    src_before = tree_hashes(src)
    ref, events = reference(layout, src, tmp_path)
    points = kill_points(events, POINTS)
    assert len(points) >= 20
    outcomes = {"absent": 0, "complete": 0}
    for k, at in enumerate(points):
        parent = tmp_path / f"k{at}"
        parent.mkdir()
        dst = parent / "out"
        code = run_forked(lambda: write(layout, src, dst), Faults(parent, at, "kill", mid_write=k % 2 == 1),
                          tmp_path / f"k{at}.json")
        assert code == -9, f"kill at event {at} ({events[at]}) did not kill: exit {code}"
        state = tree_hashes(dst)
        assert state in ({}, ref), f"kill at event {at} ({events[at]}): the destination is neither absent nor complete"
        outcomes["complete" if state else "absent"] += 1
        assert tree_hashes(src) == src_before, f"kill at event {at}: the source changed"
        # the rerun into the same folder (a new name when the killed run had finished its rename)
        again = dst if not state else parent / "out2"
        assert write(layout, src, again) == 0
        assert tree_hashes(again) == ref, f"kill at event {at}: the rerun differs from an uninterrupted run"
        assert leftovers(parent, {"out", "out2"}) == [], f"kill at event {at}: a partial survived the rerun"
    record(f"kill-{layout}", {"layout": layout, "events": len(events), "points": len(points),
                              "bytes": sum(n for _, _, n in events), **outcomes})


@pytest.mark.parametrize("layout", ["megatron", "hf-mxfp4"])
def test_repeated_kills_then_one_rerun(layout, small_mxfp4, tmp_path):
    """Dead runs into one destination never pile up: each run removes the partials of the runs before
    it, so after any number of kills one partial at most is left, and the next run removes it."""
    ref, events = reference(layout, small_mxfp4, tmp_path)
    parent = tmp_path / "out-parent"
    parent.mkdir()
    dst = parent / "out"
    for at in (len(events) // 3, len(events) // 2, 2 * len(events) // 3, len(events) // 4):
        assert run_forked(lambda: write(layout, small_mxfp4, dst), Faults(parent, at)) == -9
        left = leftovers(parent)
        assert len([n for n in left if n.endswith(".owner")]) == 1 and len(left) == 2, left
    assert write(layout, small_mxfp4, dst) == 0
    assert leftovers(parent, {"out"}) == []
    assert tree_hashes(dst) == ref
