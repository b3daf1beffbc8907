"""A full disk, or a failing one (issue 18 item 3): ENOSPC or EIO injected at the write calls, at
points spread over each writer's run (the owner record, every file's creation, data writes cut
short, the commit rename). Each ends in one clear error naming the file being written, exit 1,
nothing left beside the destination, the destination not written, the source unchanged."""
from __future__ import annotations

import pytest

from gptoss_verify.formats.fileio import partials

from .conftest import THOROUGH, leftovers, tree_hashes
from .faults import Faults, installed
from .test_kill import record
from .writers import WRITERS, write

POINTS = 40 if THOROUGH else 12


def events_of(layout, src, tmp_path):
    parent = tmp_path / "ref"
    parent.mkdir()
    faults = Faults(parent)
    with installed(faults):
        assert write(layout, src, parent / "out") == 0
    return faults.events


def error_lines(err: str) -> list[str]:
    """The lines of stderr that are not a progress bar's redraws."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    return [line for line in lines if line.strip() and not line.startswith("note: ")]


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_write_errors_end_in_one_clear_error(layout, small_mxfp4, tmp_path, capsys):
    src_before = tree_hashes(small_mxfp4)
    events = events_of(layout, small_mxfp4, tmp_path)
    # removals are not write calls, nor is a mkdir of a folder that exists (the kernel says EEXIST first)
    writes = [i for i, e in enumerate(events) if e[0] not in ("remove", "mkdir-existing")]
    rename = max(i for i, e in enumerate(events) if e[0] == "rename")
    points = sorted({writes[round(i * (len(writes) - 1) / (POINTS - 1))] for i in range(POINTS)} | {0, rename})
    outcomes = {"ENOSPC": 0, "EIO": 0}
    capsys.readouterr()
    for k, at in enumerate(points):
        action = "ENOSPC" if k % 2 == 0 else "EIO"
        parent = tmp_path / f"e{at}"
        parent.mkdir()
        dst = parent / "out"
        faults = Faults(parent, at, action)
        with installed(faults):
            code = write(layout, small_mxfp4, dst)
        lines = error_lines(capsys.readouterr().err)
        where = f"{action} at event {at} {events[at]}"
        assert faults.fired, where
        assert code == 1, f"{where}: exit {code}"
        assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in lines[0], f"{where}: {lines}"
        reason = "No space left on device" if action == "ENOSPC" else "Input/output error"
        assert reason in lines[0] and f"{dst}" in lines[0], f"{where}: {lines[0]}"
        named = lines[0].split(": error: ", 1)[1].split(": cannot write", 1)[0]
        assert named.startswith(str(dst)), f"{where}: names {named}"
        assert ".partial" not in named, f"{where}: names the partial, not the destination: {named}"
        assert leftovers(parent) == [], f"{where}: left {leftovers(parent)}"
        assert tree_hashes(small_mxfp4) == src_before
        outcomes[action] += 1
    record(f"disk-{layout}", {"layout": layout, "points": len(points), **outcomes})


def test_the_error_names_the_file_being_written(small_mxfp4, tmp_path, capsys):
    """A data write that fails names that shard (its final name), not the partial's."""
    events = events_of("hf-bf16", small_mxfp4, tmp_path)
    at = next(i for i, (kind, path, n) in enumerate(events) if kind == "write" and n > 1000)
    shard = events[at][1].rsplit("/", 1)[-1]
    parent = tmp_path / "x"
    parent.mkdir()
    capsys.readouterr()
    with installed(Faults(parent, at, "ENOSPC")):
        assert write("hf-bf16", small_mxfp4, parent / "out") == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{parent / 'out' / shard}: cannot write ([Errno 28] No space left on device)" in line


def test_write_file_leaves_nothing_on_a_full_disk(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old\n")
    for at in range(6):
        with installed(Faults(tmp_path, at, "ENOSPC")) as f:
            with pytest.raises(partials.WriteError, match="report.md: cannot write"):
                partials.write_file(target, "new text\n" * 100)
        assert f.fired
        assert target.read_text() == "old\n" and leftovers(tmp_path) == ["report.md"]
