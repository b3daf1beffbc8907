"""Inputs and kill points chosen by hand, outside what the battery generates (issue 18, "How it will
be checked"): keys given twice, data with holes or trailing bytes, tensors sharing bytes,
destinations that are links, and the real CLI process killed at random moments, again and again.
Each ends cleanly: one error line naming the file and the tensor or field, exit 1; or a complete,
byte-identical output and no partial left after the next run."""
from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import cli, leftovers, tree_hashes


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "hf"
    assert cli("make-checkpoint", out, "--layers", 2, "--seed", 4) == 0
    return out


def _copy(hf: Path, tmp_path: Path) -> Path:
    import shutil
    shutil.copytree(hf, tmp_path / "src")
    return tmp_path / "src"


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write(path: Path, header_text: str, data: bytes) -> None:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _refused(capsys, *argv) -> str:
    capsys.readouterr()
    assert cli(*argv) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in lines[0], lines
    return lines[0]


def _edit_header(src: Path, edit) -> str:
    """Apply `edit(header, data) -> (header_text, data)` to the one shard; returns a tensor name."""
    shard = src / "model.safetensors"
    header, data = _header(shard)
    text, data = edit(header, data)
    _write(shard, text, data)
    return str(shard)


@pytest.mark.parametrize("command", ["inspect", "convert", "diff"])
def test_a_tensor_named_twice_in_a_header_is_refused_by_name(command, hf, tmp_path, capsys):
    src = _copy(hf, tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"

    def twice(header, data):  # the second entry points at another tensor's bytes of the same size
        other = header["model.layers.1.self_attn.v_proj.weight"]
        return json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(other)}}}", data
    shard = _edit_header(src, twice)
    argv = {"inspect": ["inspect", src], "convert": ["convert", src, tmp_path / "out", "--to", "openai"],
            "diff": ["diff", hf, src]}[command]
    line = _refused(capsys, *argv)
    assert shard in line and name in line and "twice" in line, line
    assert not (tmp_path / "out").exists()


def test_a_hole_or_trailing_bytes_in_the_data_are_refused(hf, tmp_path, capsys):
    """The safetensors format has the tensors tile the data exactly (its own reader refuses a hole
    with "invalid offset"): a hole names the tensor after it, trailing bytes the count."""
    src = _copy(hf, tmp_path)

    def hole(header, data):
        for name, e in header.items():
            if name != "__metadata__":
                e["data_offsets"] = [o + 16 for o in e["data_offsets"]]
        return json.dumps(header), bytes(16) + data
    shard = _edit_header(src, hole)
    header, _ = _header(Path(shard))
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    line = _refused(capsys, "inspect", src)
    assert shard in line and f"tensor {first}" in line and "hole of 16 bytes" in line, line

    src2 = _copy(hf, tmp_path / "b")
    shard2 = _edit_header(src2, lambda header, data: (json.dumps(header), data + b"\0" * 24))
    line = _refused(capsys, "convert", src2, tmp_path / "out", "--to", "hf")
    assert shard2 in line and "24 bytes after the last tensor" in line, line


def test_two_tensors_sharing_bytes_are_refused_naming_both(hf, tmp_path, capsys):
    src = _copy(hf, tmp_path)
    a, b = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"

    def alias(header, data):
        header[b]["data_offsets"] = header[a]["data_offsets"]
        return json.dumps(header), data
    _edit_header(src, alias)
    line = _refused(capsys, "inspect", src)
    assert a in line and b in line and "overlaps" in line, line


def test_a_config_field_given_twice_is_refused_once_by_name(hf, tmp_path, capsys):
    src = _copy(hf, tmp_path)
    cfg = src / "config.json"
    cfg.write_text(cfg.read_text().rstrip().rstrip("}") + ', "num_hidden_layers": 3}')
    line = _refused(capsys, "inspect", src)
    assert f"{cfg}: not valid JSON" in line and "'num_hidden_layers' appears twice" in line, line
    assert line.count(str(cfg)) == 1, line


def test_layer_types_of_another_length_say_so(hf, tmp_path, capsys):
    src = _copy(hf, tmp_path)
    data = json.loads((src / "config.json").read_text())
    data["layer_types"] = data["layer_types"] + ["sliding_attention"]
    (src / "config.json").write_text(json.dumps(data))
    line = _refused(capsys, "inspect", src)
    assert "layer_types: expected one entry per layer (2, num_hidden_layers), got 3" in line, line


def test_a_symlink_as_the_destination_folder_is_refused(hf, tmp_path, capsys):
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "link")
    line = _refused(capsys, "convert", hf, tmp_path / "link", "--to", "openai")
    assert f"{tmp_path / 'link'}: destination is a symbolic link" in line, line
    assert os.listdir(tmp_path / "real") == [] and leftovers(tmp_path) == ["link", "real"]


def test_a_report_through_a_symlink_writes_the_file_it_points_to(hf, tmp_path):
    (tmp_path / "docs").mkdir()
    os.symlink("docs/report.md", tmp_path / "report.md")
    assert cli("diff", hf, hf, "--report", tmp_path / "report.md", "--tokens", 4) == 0
    assert (tmp_path / "report.md").is_symlink()
    assert "SAME MODEL" in (tmp_path / "docs" / "report.md").read_text()
    assert leftovers(tmp_path / "docs") == ["report.md"]


def test_the_cli_killed_at_random_moments_again_and_again(tmp_path):
    """`case export` run as its own process and SIGKILLed at random moments after it has claimed its
    partial, cycle after cycle into one folder: the destination is absent or complete and
    byte-identical, at most one dead partial is ever left, and the next run removes it."""
    argv = [sys.executable, "-m", "gptoss_verify.cli", "case", "export", None, "--layers", 2, "--seq", 16,
            "--seed", 6]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))

    def start(dst):
        return subprocess.Popen([str(a) if a is not None else str(dst) for a in argv], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    assert start(tmp_path / "ref").wait(120) == 0
    ref = tree_hashes(tmp_path / "ref")
    parent = tmp_path / "p"
    parent.mkdir()
    dst = parent / "out"
    rng = random.Random(18)
    for cycle in range(5):
        before = set(os.listdir(parent))
        proc = start(dst)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not (set(os.listdir(parent)) - before) and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = tree_hashes(dst)
        assert state in ({}, ref), f"cycle {cycle}: the destination is neither absent nor complete"
        owners = [n for n in os.listdir(parent) if n.endswith(".owner")]
        assert len(owners) <= 1, f"cycle {cycle}: dead partials pile up: {sorted(os.listdir(parent))}"
        if state:
            import shutil
            shutil.rmtree(dst)
    assert start(dst).wait(120) == 0
    assert tree_hashes(dst) == ref and leftovers(parent, {"out"}) == []


@pytest.mark.parametrize("quant,said", [({"quant_method": "fp8"}, "expected 'mxfp4', got 'fp8'"),
                                        ("mxfp4", "expected an object, got 'mxfp4'")])
def test_a_quantization_other_than_mxfp4_is_refused(quant, said, tmp_path, capsys):
    src = tmp_path / "mx"
    assert cli("make-checkpoint", src, "--mxfp4", "--layers", 1, "--seed", 2) == 0
    data = json.loads((src / "config.json").read_text())
    data["quantization_config"] = quant
    (src / "config.json").write_text(json.dumps(data))
    line = _refused(capsys, "convert", src, tmp_path / "out", "--to", "openai")
    assert f"{src / 'config.json'}: quantization_config" in line and said in line, line


def test_a_flipped_byte_in_a_rank_files_tensor_data_is_refused_by_its_crc(hf, tmp_path, capsys):
    """torch.load never checks a record's CRC-32; our reader does, so a byte changed inside a
    tensor's data is named (file and record), not read as weights."""
    import zipfile
    meg = tmp_path / "meg"
    assert cli("convert", hf, meg, "--to", "megatron") == 0
    rank = next(meg.glob("iter_*/mp_rank_*/model_optim_rng.pt"))
    with zipfile.ZipFile(rank) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw = bytearray(rank.read_bytes())
    raw[start + info.file_size // 2] ^= 0x10
    rank.write_bytes(bytes(raw))
    before = tree_hashes(meg)
    err = _refused(capsys, "convert", meg, tmp_path / "out", "--to", "hf")
    record = info.filename.split("/", 1)[1]
    assert f"{rank}: record {record}: CRC-32" in err and "the tensor's bytes were changed" in err
    assert tree_hashes(meg) == before and not (tmp_path / "out").exists()


def test_a_torch_dist_entry_without_its_fields_is_refused_by_key(hf, tmp_path, capsys):
    """An allowed class unpickled with its attributes missing (a pickle's BUILD step sets any) is
    named by its key, not an AttributeError traceback (found by the thorough battery)."""
    import pickle
    dist = tmp_path / "dist"
    assert cli("convert", hf, dist, "--to", "megatron-dist") == 0
    meta = next(dist.glob("iter_*/.metadata"))
    md = pickle.loads(meta.read_bytes())
    key = next(k for k, v in md.state_dict_metadata.items() if hasattr(v, "properties"))
    del md.state_dict_metadata[key].properties
    meta.write_bytes(pickle.dumps(md))
    err = _refused(capsys, "convert", dist, tmp_path / "out", "--to", "hf")
    assert f"state_dict_metadata[{key!r}]: properties: expected TensorProperties" in err


def test_a_zip_directory_pythons_zipfile_cannot_read_is_refused_by_file(hf, tmp_path, capsys):
    """A central-directory entry claiming zip version 6.4 (torch's reader ignores it, zipfile raises
    NotImplementedError): one error naming the rank file, not a traceback (found by the thorough battery)."""
    meg = tmp_path / "meg"
    assert cli("convert", hf, meg, "--to", "megatron") == 0
    rank = next(meg.glob("iter_*/mp_rank_*/model_optim_rng.pt"))
    raw = bytearray(rank.read_bytes())
    entry = raw.find(b"PK\x01\x02")
    raw[entry + 6:entry + 8] = (64).to_bytes(2, "little")  # version needed to extract
    rank.write_bytes(bytes(raw))
    err = _refused(capsys, "convert", meg, tmp_path / "out", "--to", "hf")
    assert f"{rank}: its zip directory does not read" in err


def test_a_field_name_with_a_newline_stays_one_error_line(hf, tmp_path, capsys):
    """An input's own text (here a sidecar spec field named "x\\ny") never splits the error line
    (found by the thorough battery)."""
    meg = tmp_path / "meg"
    assert cli("convert", hf, meg, "--to", "megatron") == 0
    sidecar = meg / "gptoss_verify_megatron.json"
    data = json.loads(sidecar.read_text())
    data["spec"]["x\ny"] = 1
    sidecar.write_text(json.dumps(data))
    err = _refused(capsys, "convert", meg, tmp_path / "out", "--to", "hf")
    assert "'x\\ny': unknown ModelSpec field" in err


def _rank_with_pickle(meg: Path, edit) -> Path:
    """Rewrite the first rank file's data.pkl as `edit(pkl)` (the zip rebuilt around it)."""
    import io
    import zipfile
    rank = next(meg.glob("iter_*/mp_rank_*/model_optim_rng.pt"))
    zf = zipfile.ZipFile(io.BytesIO(rank.read_bytes()))
    pkl_info = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
    pkl = edit(zf.read(pkl_info))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as w:
        for info in zf.infolist():
            w.writestr(info, pkl if info is pkl_info else zf.read(info))
    rank.write_bytes(out.getvalue())
    return rank


@pytest.mark.parametrize("change", ["stride", "storage offset"])
def test_a_rank_file_tensor_reaching_past_its_record_is_refused_by_record(change, hf, tmp_path, capsys):
    """A 2-D tensor's stride (64, 1) pickled as (65, 1), or its storage offset 0 as 16: the view
    reaches past its record's bytes. One error naming the rank file and the record, not a
    RuntimeError traceback from `as_strided` (found by the thorough battery)."""
    import re
    meg = tmp_path / "meg"
    assert cli("convert", hf, meg, "--to", "megatron") == 0

    def edit(pkl):
        # _rebuild_tensor_v2(storage, offset, shape, stride, ...) of a [rows, 64] tensor: BINPERSID,
        # offset 0 (K\x00), shape (rows, 64) (M.. or K.., K@, TUPLE2, BINPUT), stride (64, 1) (K@ K\x01 TUPLE2)
        m = re.search(rb"Q(K\x00)(?:M..|K.)K@\x86q.(K@)K\x01\x86", pkl, re.DOTALL)
        assert m is not None, "no 2-D tensor with 64 columns in data.pkl"
        at, new = (m.start(2), b"KA") if change == "stride" else (m.start(1), b"K\x10")
        return pkl[:at] + new + pkl[at + 2:]
    rank = _rank_with_pickle(meg, edit)
    before = tree_hashes(meg)
    err = _refused(capsys, "convert", meg, tmp_path / "out", "--to", "hf")
    assert f"{rank}: record data/" in err and "past the record's" in err, err
    assert tree_hashes(meg) == before and not (tmp_path / "out").exists()


#: data.pkl replaced by: a memo store with nothing on the stack (the weights_only unpickler raises
#: IndexError), and a tensor the pickle builds itself on the meta device (no record behind it)
_BAD_PICKLES = {"memo of an empty stack": (b"\x80\x02q\x00.", "data.pkl does not unpickle (IndexError"),
                "a tensor without a record": (b"\x80\x02ctorch._utils\n_rebuild_meta_tensor_no_storage\n(ctorch\n"
                                              b"bfloat16\nK\x04\x85K\x01\x85\x89tR.",
                                              "a tensor not stored in a record of the file")}


@pytest.mark.parametrize("what", sorted(_BAD_PICKLES))
def test_a_rank_files_broken_pickle_is_refused_by_file(what, hf, tmp_path, capsys):
    """A data.pkl the unpickler fails on in a way other than a refused global, or one building a
    tensor of its own: one error naming the rank file, not an IndexError traceback or a bare
    KeyError line without the file (the first found by the thorough battery, seed 4)."""
    meg = tmp_path / "meg"
    assert cli("convert", hf, meg, "--to", "megatron") == 0
    pkl, said = _BAD_PICKLES[what]
    rank = _rank_with_pickle(meg, lambda _: pkl)
    err = _refused(capsys, "convert", meg, tmp_path / "out", "--to", "hf")
    assert f"{rank}: " in err and said in err, err
