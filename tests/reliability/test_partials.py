"""The ownership rules of partial outputs (gptoss_verify/formats/fileio/partials.py): a sweep removes the partials
of writers that are gone and never a live writer's, another host's, or a user's own file."""
from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from gptoss_verify.formats.fileio import partials

from .conftest import leftovers


def _fork_claim(dst, directory=True):
    """A child that claims a partial for `dst` and sleeps; returns its pid once the claim exists."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            partials.claim(dst, directory=directory)
            os.write(w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    return pid


def test_a_live_writers_partial_is_kept_a_dead_ones_removed(tmp_path):
    pid = _fork_claim(tmp_path / "out")
    try:
        live = leftovers(tmp_path)
        assert len(live) == 2 and any(n.endswith(".owner") for n in live)
        assert partials.sweep(tmp_path) == [] and leftovers(tmp_path) == live
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    removed = partials.sweep(tmp_path)
    assert [p.name for p in removed] == [n for n in live if not n.endswith(".owner")]
    assert leftovers(tmp_path) == []


def _dead_partial(parent, record: dict | None, name="out"):
    """A partial with an unlocked owner record as a killed writer leaves it."""
    path = parent / f".{name}.partial-0123456789ab"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"x" * 100)
    owner = path.with_name(path.name + partials.OWNER_SUFFIX)
    owner.write_text(json.dumps(record) if record is not None else "")
    return path


def test_a_reused_pid_does_not_keep_a_partial(tmp_path):
    record = partials.owner_record()  # this very process ... started at another time: a reuse of the pid
    record["start_ticks"] = (record["start_ticks"] or 0) + 12345
    _dead_partial(tmp_path, record)
    assert len(partials.sweep(tmp_path)) == 1 and leftovers(tmp_path) == []


def test_a_running_owner_keeps_its_partial_even_unlocked(tmp_path):
    """No lock held (say, a filesystem without locks) but the record's process runs: kept."""
    _dead_partial(tmp_path, partials.owner_record())
    assert partials.sweep(tmp_path) == [] and len(leftovers(tmp_path)) == 2


def test_another_hosts_partial_is_kept(tmp_path):
    record = {**partials.owner_record(), "host": socket.gethostname() + "-elsewhere", "pid": 1}
    _dead_partial(tmp_path, record)
    assert partials.sweep(tmp_path) == [] and len(leftovers(tmp_path)) == 2


@pytest.mark.parametrize("record", [None, {"pid": 2 ** 22 + 7, "host": socket.gethostname()}])
def test_empty_or_dead_records_and_legacy_partials_go(tmp_path, record):
    _dead_partial(tmp_path, record)
    legacy = tmp_path / ".old.partial-abcd_123"  # tempfile.mkdtemp's name, from before owner records
    legacy.mkdir()
    (tmp_path / ".owner-less.partial-zzzzzzzz.owner.bak").write_text("a user's file")
    (tmp_path / "notes.partial-12345678").write_text("a user's file")
    partials.sweep(tmp_path)
    assert leftovers(tmp_path) == [".owner-less.partial-zzzzzzzz.owner.bak", "notes.partial-12345678"]


def test_an_owner_record_left_after_the_commit_goes(tmp_path):
    """Killed between the rename onto the destination and dropping the record: the record goes."""
    (tmp_path / "out").mkdir()
    owner = tmp_path / ".out.partial-0123456789ab.owner"
    owner.write_text(json.dumps({"pid": 2 ** 22 + 9, "host": socket.gethostname()}))
    partials.sweep(tmp_path)
    assert leftovers(tmp_path) == ["out"]


def test_claims_sweep_and_clean_up(tmp_path):
    _dead_partial(tmp_path, None, name="other")
    with partials.atomic_output(tmp_path / "out", directory=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.partial-")
        assert sorted(leftovers(tmp_path)) == sorted([tmp.name, tmp.name + ".owner"])  # the dead one swept
        (tmp / "a").write_text("a")
    assert leftovers(tmp_path) == ["out"] and (tmp_path / "out" / "a").read_text() == "a"
    with pytest.raises(RuntimeError):
        with partials.atomic_output(tmp_path / "b", directory=True) as tmp:
            raise RuntimeError("writer failed")
    with partials.scratch_directory(tmp_path, "work") as tmp:
        assert tmp.is_dir()
    assert leftovers(tmp_path) == ["out"]


def test_write_file_replaces_atomically(tmp_path):
    target = tmp_path / "r.md"
    partials.write_file(target, "one\n")
    partials.write_file(target, b"two\n")
    assert target.read_text() == "two\n" and leftovers(tmp_path) == ["r.md"]


def test_two_writers_into_one_destination(tmp_path):
    """The second to finish is refused in one line, and the first one's output stays as it wrote it."""
    dst = tmp_path / "out"
    with pytest.raises(partials.WriteError, match="was written by another run"):
        with partials.atomic_output(dst, directory=True) as slow:
            (slow / "b").write_text("slow")
            with partials.atomic_output(dst, directory=True) as fast:
                (fast / "a").write_text("fast")
    assert [p.name for p in dst.iterdir()] == ["a"] and leftovers(tmp_path) == ["out"]


def test_a_read_error_is_not_reported_as_a_write_error(tmp_path):
    """An OSError about a file outside the partial (a source that vanished) stays what it is."""
    with pytest.raises(FileNotFoundError):
        with partials.atomic_output(tmp_path / "out", directory=True):
            open(tmp_path / "missing-source.bin", "rb")
    assert leftovers(tmp_path) == []


def test_a_nested_outputs_error_names_the_outer_destination(tmp_path):
    """A write error inside a folder inside a folder (a checkpoint inside a case) names the file by
    its final path under the outer destination."""
    dst = tmp_path / "case"
    with pytest.raises(partials.WriteError) as info:
        with partials.atomic_directory(dst) as outer:
            with partials.atomic_directory(outer / "checkpoint") as inner:
                raise OSError(28, "No space left on device", str(inner / "model.safetensors"))
    assert str(info.value).startswith(f"{dst / 'checkpoint' / 'model.safetensors'}: cannot write ([Errno 28]")
    assert leftovers(tmp_path) == []


def test_parameter_count_matches_the_canonical_shapes():
    """The closed form that bounds a spec read from a file counts what the canonical shapes hold."""
    import math

    from gptoss_verify.config import TINY_VARIANTS, preset
    from gptoss_verify.schema import canonical_shapes, parameter_count
    for spec in [*TINY_VARIANTS.values(), preset("gpt-oss-20b"), preset("gpt-oss-120b")]:
        assert parameter_count(spec) == sum(math.prod(s) for s in canonical_shapes(spec).values())


@pytest.mark.parametrize("layout,file,edit", [
    ("megatron", "gptoss_verify_megatron.json", lambda m: m["spec"].update(num_experts=2 ** 40)),
    ("megatron-dist", "gptoss_verify_megatron.json", lambda m: m["spec"].update(num_layers=10 ** 9)),
    ("hf", "config.json", lambda m: m.update(num_hidden_layers=10 ** 8, layer_types=None)),
])
def test_a_spec_claiming_a_huge_model_is_refused_before_planning(layout, file, edit, small_mxfp4, tmp_path, capsys):
    """Readers plan per layer and expert from the config; one claiming far more than the files hold
    is refused in one line (it used to hang, planning 1e8 layers)."""
    import json
    import time

    from .conftest import cli
    src = tmp_path / "m"
    assert cli("convert", small_mxfp4, src, "--to", layout) == 0
    meta = json.loads((src / file).read_text())
    edit(meta)
    (src / file).write_text(json.dumps(meta))
    capsys.readouterr()
    start = time.monotonic()
    assert cli("convert", src, tmp_path / "out", "--to", "hf") == 1
    assert time.monotonic() - start < 10
    assert f"{file}: describes a model of" in capsys.readouterr().err
