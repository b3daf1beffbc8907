"""The generated bad-input battery (issue 18 item 4; targets and mutations in battery.py). Every
mutated input ends in exactly one of:
- accepted and correct: exit 0, and the output checked (`raw`: every tensor of the output has the
  name, dtype, shape and bytes the input's own header gives it, read by a parser of this test; `valid`:
  the output passes `inspect`);
- one clear error: exit 1 and one line on stderr, `gptoss-verify <command>: error: ...`;
and never a traceback, a hang (TIME_BOUND_S per input), an allocation far beyond the input's size (an
address-space limit), a forbidden global run (a marker file), a write into the input or its change,
or anything left beside the destination."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss_verify.subjects.protocol import Case

from .battery import MARKER, TARGETS, fresh_copy, mutated, run_clean
from .conftest import THOROUGH, cli, tree_hashes
from .test_kill import record

EXAMPLES = settings().max_examples if THOROUGH else 15  # per target; 25 x 9 targets is over the CI budget


@pytest.fixture(scope="module")
def pristine(small_mxfp4, tmp_path_factory) -> dict[str, Path]:
    """One small valid checkpoint per layout the targets live in."""
    root = tmp_path_factory.mktemp("battery")
    out = {"hf": root / "hf"}  # bf16, sharded with an index
    assert cli("make-checkpoint", out["hf"], "--layers", 2, "--max-shard-size", 60_000, "--seed", 9) == 0
    for layout, extra in (("openai", []), ("megatron", []), ("megatron-dist", [])):
        out[layout] = root / layout
        assert cli("convert", small_mxfp4, out[layout], "--to", layout, *extra) == 0
    out["case"] = _case_with_dump(root / "case")
    return out


def _case_with_dump(root: Path) -> Path:
    """An exported case (`case/`) and an engine's dump of it (`dump.safetensors`: our reference
    model's logits and one trace point, as an out-of-process engine would write them)."""
    import torch
    from safetensors.torch import save_file

    from gptoss_verify.config import preset
    from gptoss_verify.subjects.dump import export_case, load_case
    from gptoss_verify.subjects.ours import Ours
    from gptoss_verify.weights import random_weights
    spec = preset("tiny").with_layers(2)
    ids = torch.randint(0, spec.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    export_case(Case(spec, ids, 3, torch.bfloat16, random_weights(spec, 0, "typical", torch.float32)), root / "case")
    out = Ours("reference").run(load_case(root / "case"))
    save_file({"logits": out.logits.contiguous(), "layers.1.attn_out": out.points["layers.1.attn_out"].contiguous()},
              str(root / "dump.safetensors"))
    return root


def raw_tensors(ckpt: Path) -> dict[str, tuple[str, list, str]]:
    """name -> (dtype, shape, sha256 of the bytes) from every *.safetensors header, parsed here."""
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        header.pop("__metadata__", None)
        for name, e in header.items():
            b, end = e["data_offsets"]
            out[name] = (e["dtype"], e["shape"], hashlib.sha256(data[8 + n + b:8 + n + end]).hexdigest())
    return out


def check_one(target, src: Path, work: Path, how: str, outcomes: Counter, pristine) -> None:
    before = tree_hashes(src)
    dst = work / "out"
    MARKER.unlink(missing_ok=True)
    code, err, writes = run_clean(target.command(src, dst, pristine), src, work)
    where = f"{target.name} ({how})"
    assert not MARKER.exists(), f"{where}: a pickled global ran"
    assert code in (0, 1), f"{where}: exit {code}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, f"{where}: a traceback:\n{err[-3000:]}"
    assert writes == [], f"{where}: wrote into the input: {writes[:3]}"
    assert tree_hashes(src) == before, f"{where}: the input changed"
    lines = [ln.rsplit("\r", 1)[-1] for ln in err.split("\n") if ln.rsplit("\r", 1)[-1].strip()]
    lines = [ln for ln in lines if not ln.startswith("removing ")]
    if code == 1 and target.oracle == "diff" and dst.is_file():  # a difference found, reported: not an error
        assert lines == [], f"{where}: a report and error lines {lines}"
        assert json.loads(dst.read_text())["same_model"] is False, f"{where}: exit 1 with a report of the same model"
        outcomes["accepted"] += 1
        return
    if code == 1:
        assert len(lines) == 1 and ": error: " in lines[0], f"{where}: expected one error line, got {lines}"
        assert sorted(os.listdir(work)) == ["events.json", "events.json.stderr", "src"], f"{where}: left behind"
        outcomes["refused"] += 1
        return
    if target.oracle in OTHER_ORACLES:
        problem = OTHER_ORACLES[target.oracle](src, dst, pristine)
        assert problem is None, f"{where}: accepted, but {problem}"
        outcomes["accepted"] += 1
        return
    assert dst.is_dir(), f"{where}: exit 0 without an output"
    if target.oracle == "raw":
        assert raw_tensors(dst) == raw_tensors(src), f"{where}: accepted, but the output's tensors differ"
    else:
        assert cli("inspect", dst) == 0, f"{where}: accepted, but the output does not pass inspect"
    outcomes["accepted"] += 1


def _dump_oracle(src: Path, dst: Path) -> str | None:
    """An accepted dump was judged (a verdict written), and its logits, as parsed here, have the
    case's [batch, seq, vocab] shape."""
    manifest = json.loads((src / "case" / "manifest.json").read_text())
    logits = raw_header(src / "dump.safetensors").get("logits")
    want = [manifest["batch"], manifest["seq"], manifest["spec"]["vocab_size"]]
    if not dst.is_file():
        return "no verdict written"
    if logits is None or logits["shape"] != want or logits["dtype"] not in ("F32", "BF16", "F16", "F64"):
        return f"the dump's logits are {logits}, expected float {want}"
    return None


def _case_oracle(src: Path, dst: Path) -> str | None:
    """An accepted case: every file is listed in the manifest with its true sha256 (hashed here) and
    the inputs are the [batch, seq] int64 ids the manifest says."""
    case = src / "case"
    manifest = json.loads((case / "manifest.json").read_text())
    files = {str(p.relative_to(case)) for p in case.rglob("*") if p.is_file() and p.name != "manifest.json"}
    listed = manifest["sha256"]
    if set(listed) != files:
        return f"the manifest lists {sorted(set(listed) ^ files)[:3]} differently from the files"
    bad = [r for r, d in listed.items() if hashlib.sha256((case / r).read_bytes()).hexdigest() != d]
    ids = raw_header(case / "inputs.safetensors").get("input_ids")
    if bad:
        return f"{bad[0]}'s sha256 differs from the manifest's"
    if ids is None or ids["dtype"] != "I64" or ids["shape"] != [manifest["batch"], manifest["seq"]]:
        return f"input_ids are {ids}, the manifest says [{manifest['batch']}, {manifest['seq']}]"
    return _dump_oracle(src, dst)


def _diff_oracle(src: Path, dst: Path, pristine) -> str | None:
    """`diff A B` said the same model: then B's tensors are A's (name, dtype, shape, bytes)."""
    report = json.loads(dst.read_text())
    if report.get("same_model") is not True:
        return f"exit 0 but the report says same_model={report.get('same_model')!r}"
    if raw_tensors(src) != raw_tensors(pristine["hf"]):
        return "diff says the same model, but B's tensors differ from A's"
    return None


OTHER_ORACLES = {"dump": lambda src, dst, _: _dump_oracle(src, dst),
                 "case": lambda src, dst, _: _case_oracle(src, dst), "diff": _diff_oracle}


def raw_header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_mutated_input_ends_cleanly(name, pristine, tmp_path):
    target = TARGETS[name]
    outcomes: Counter = Counter()
    hows: Counter = Counter()  # (mutation kind, outcome) -> inputs

    @settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                            HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def one(data):
        work = tmp_path / "w"
        src = fresh_copy(pristine[target.layout], work)
        rel, how = data.draw(mutated(target, src), label="mutation")
        before = dict(outcomes)
        check_one(target, src, work, f"{rel}: {how}", outcomes, pristine)
        (outcome,) = [k for k in outcomes if outcomes[k] != before.get(k, 0)]
        hows[f"{how} -> {outcome}"] += 1

    one()
    assert sum(outcomes.values()) >= min(EXAMPLES, 10)
    record(f"battery-{name}", {"target": name, "inputs": sum(outcomes.values()), **outcomes, "kinds": dict(hows)})


def test_the_bounds_bite(tmp_path):
    """The harness's own bounds: an allocation far past the input's size fails in the child, and a
    hang is cut at the time bound."""
    import torch

    from . import battery
    from .faults import Faults, run_forked

    def allocate():
        battery._limit_memory(1000)
        torch.empty(8 << 30, dtype=torch.uint8)
        return 0

    assert run_forked(allocate, Faults(tmp_path), tmp_path / "log.json") == 97
    assert "alloc" in (tmp_path / "log.json.stderr").read_text().lower()
    with pytest.raises(TimeoutError):
        run_forked(lambda: __import__("time").sleep(30), Faults(tmp_path), timeout=0.5)


def test_a_forbidden_global_is_refused_in_each_pickle_we_read(pristine, tmp_path):
    """The two pickles we read (a rank file's data.pkl, torch_dist's .metadata), each replaced by one
    calling os.system: one error naming the file and the global, and the command never runs."""
    import io
    import zipfile

    pkl = (b"\x80\x02cos\nsystem\n(X" + len(f"touch {MARKER}").to_bytes(4, "little")
           + f"touch {MARKER}".encode() + b"tR.")
    for layout, rel in (("megatron", "iter_0000000/mp_rank_00/model_optim_rng.pt"),
                        ("megatron-dist", "iter_0000000/.metadata")):
        work = tmp_path / layout
        src = fresh_copy(pristine[layout], work)
        f = src / rel
        if f.suffix == ".pt":
            zf = zipfile.ZipFile(io.BytesIO(f.read_bytes()))
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w") as w:
                for info in zf.infolist():
                    w.writestr(info, pkl if info.filename.endswith("data.pkl") else zf.read(info))
            f.write_bytes(out.getvalue())
        else:
            f.write_bytes(pkl)
        MARKER.unlink(missing_ok=True)
        code, err, _ = run_clean(["convert", src, work / "out", "--to", "hf"], src, work)
        assert code == 1 and not MARKER.exists()
        line = err.strip().splitlines()[-1]
        assert str(f) in line and "system" in line, line
