"""The exit-code contract of `gptoss-verify`, over every registered subcommand (README, "Exit codes"):
0 checked and passed; 1 checked and failed, or bad input data, as one line on stderr naming the file;
2 usage error. A new subcommand is in `COMMAND_NAMES` as soon as it is registered, and fails here
until `CASES` below says how to drive it."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from gptoss_verify.cli import main
from gptoss_verify.commands import registered

COMMAND_NAMES = sorted(registered())


@dataclasses.dataclass
class Cases:
    """How to drive one subcommand. Each callable gets a `Files` and returns an argv (without the
    command name); `bad_input` returns (argv, the text the error line must name)."""
    usage: Callable[["Files"], list]
    bad_input: Callable[["Files"], tuple[list, str]]
    passing: Callable[["Files"], list] | None  # None: too dear for here; say where it is covered


@dataclasses.dataclass
class Files:
    tmp: Path
    ckpt: Path          # a tiny HF checkpoint (2 layers)
    bad_ckpt: Path      # the same with a config.json that cannot describe a model (field num_heads)
    bad_json: Path      # a config file that is not JSON


CASES: dict[str, Cases] = {
    "parity": Cases(
        usage=lambda f: ["--dtype", "float8"],
        bad_input=lambda f: (["--config", f.bad_json], f.bad_json.name),
        passing=lambda f: ["--preset", "tiny", "--layers", "1", "--dtype", "float64", "--profile", "typical",
                           "--seq", "8", "--batch", "1", "--report", f.tmp / "p.md", "--json", f.tmp / "p.json"]),
    "golden": Cases(
        usage=lambda f: ["verify"],
        bad_input=lambda f: (["check", "--dir", f.bad_json.parent], "manifest.json"),
        passing=lambda f: ["check", "--against", "ours", "--json", f.tmp / "g.json"]),
    "make-checkpoint": Cases(
        usage=lambda f: [f.tmp / "out", "--layers", "0"],
        bad_input=lambda f: ([f.tmp / "out", "--config", f.bad_ckpt / "config.json"], "config.json"),
        passing=lambda f: [f.tmp / "out", "--layers", "1", "--json", f.tmp / "m.json"]),
    "inspect": Cases(
        usage=lambda f: [f.ckpt, "--from", "gguf"],
        bad_input=lambda f: ([f.bad_ckpt], "config.json"),
        passing=lambda f: [f.ckpt, "--scan", "--json", f.tmp / "i.json"]),
    "convert": Cases(
        usage=lambda f: [f.ckpt, f.tmp / "out"],  # no --to
        bad_input=lambda f: ([f.bad_ckpt, f.tmp / "out", "--to", "openai"], "config.json"),
        passing=lambda f: [f.ckpt, f.tmp / "out", "--to", "openai", "--json", f.tmp / "c.json"]),
    "roundtrip": Cases(
        usage=lambda f: [f.ckpt, "--via", "gguf"],
        bad_input=lambda f: ([f.bad_ckpt, "--via", "hf", "--work-dir", f.tmp], "config.json"),
        passing=lambda f: [f.ckpt, "--via", "hf", "--work-dir", f.tmp, "--json", f.tmp / "r.json"]),
    "sharded-forward": Cases(
        usage=lambda f: [f.ckpt],  # no --reference
        bad_input=lambda f: ([f.ckpt, "--reference", f.ckpt], f.ckpt.name),  # HF, not Megatron
        passing=None),  # spawns processes: tests/distributed/test_sharded_forward.py::test_cli_report_and_exit_status
    "diff": Cases(
        usage=lambda f: [f.ckpt],  # no B
        bad_input=lambda f: ([f.ckpt, f.bad_ckpt], "config.json"),
        passing=lambda f: [f.ckpt, f.ckpt, "--tokens", "4", "--json", f.tmp / "d.json"]),
    "matrix": Cases(
        usage=lambda f: ["--subject", "no-such-subject"],
        bad_input=lambda f: (["--subject", "reference", "--config", f.bad_json], f.bad_json.name),
        passing=lambda f: ["--subject", "reference", "--dtype", "float64", "--layers", "1", "--batch", "1",
                           "--seq", "4", "--no-probes", "--report", f.tmp / "mx.md", "--json", f.tmp / "mx.json"]),
    "case": Cases(
        usage=lambda f: ["export", f.tmp / "case", "--to", "gguf"],
        bad_input=lambda f: (["export", f.tmp / "case", "--config", f.bad_json], f.bad_json.name),
        passing=lambda f: ["export", f.tmp / "case", "--layers", "1", "--seq", "4", "--json", f.tmp / "ce.json"]),
    "judge": Cases(
        usage=lambda f: [f.tmp],  # no DUMP
        bad_input=lambda f: ([f.bad_json.parent, f.tmp / "dump.safetensors"], "manifest.json"),
        passing=lambda f: [*_case_and_dump(f.tmp), "--json", f.tmp / "j.json"]),
}


def _case_and_dump(tmp: Path) -> list[Path]:
    """A one-layer case exported by the command and our reference's dump of it (logits only)."""
    from safetensors.torch import save_file

    from gptoss_verify.subjects.dump import load_case
    from gptoss_verify.subjects.ours import Ours
    case_dir, dump = tmp / "jcase", tmp / "jdump.safetensors"
    assert main(["case", "export", str(case_dir), "--layers", "1", "--seq", "4", "--batch", "1"]) == 0
    save_file({"logits": Ours("reference").run(load_case(case_dir)).logits.contiguous()}, str(dump))
    return [case_dir, dump]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    ckpt = root / "tiny-ckpt"
    assert main(["make-checkpoint", str(ckpt), "--layers", "2", "--seed", "1"]) == 0
    bad = root / "bad-ckpt"
    bad.mkdir()
    for p in ckpt.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_attention_heads"] = 7  # not a multiple of the 2 KV heads
    (bad / "config.json").write_text(json.dumps(cfg))
    return ckpt, bad


@pytest.fixture
def files(ckpts, tmp_path) -> Files:
    bad_json = tmp_path / "broken" / "manifest-or-config.json"
    bad_json.parent.mkdir()
    bad_json.write_text('{"hidden_size": 64,')
    (bad_json.parent / "manifest.json").write_text("{not json")
    return Files(tmp_path, *ckpts, bad_json)


def _cases(name: str) -> Cases:
    if name not in CASES:
        pytest.fail(f"subcommand {name!r} is registered but has no exit-code cases in {__file__}")
    return CASES[name]


def _run(name: str, argv: list, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([name, *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_every_registered_command_has_cases():
    assert sorted(CASES) == COMMAND_NAMES


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_usage_error_exits_2(name, files, capsys):
    for argv in (["--no-such-option"], _cases(name).usage(files)):
        rc, out, err = _run(name, argv, capsys)
        assert rc == 2, (argv, out, err)
        assert err.startswith("usage: gptoss-verify") and "error:" in err and "Traceback" not in err, err


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_bad_input_exits_1_with_one_line_naming_the_file(name, files, capsys):
    argv, names = _cases(name).bad_input(files)
    rc, out, err = _run(name, argv, capsys)
    assert rc == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gptoss-verify {name}: error: ") and names in lines[0], lines[0]


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_passing_run_exits_0(name, files, capsys):
    make = _cases(name).passing
    if make is None:
        pytest.skip(f"{name}: a passing run is covered where it is cheap enough (see CASES)")
    argv = make(files)
    rc, out, err = _run(name, argv, capsys)
    assert rc == 0, (out, err)
    reports = [Path(a) for a, prev in zip(argv[1:], argv) if prev == "--json"]
    for path in reports:  # --json PATH means the same everywhere: the results, as JSON, at PATH
        doc = json.loads(path.read_text())
        assert doc, path


def test_a_bad_config_is_bad_input_for_every_command_that_reads_one(files, capsys):
    """The same bad field exits 1 from parity and make-checkpoint (it once exited 2 from parity)."""
    bad = files.bad_ckpt / "config.json"
    for argv in (["parity", "--config", bad], ["make-checkpoint", files.tmp / "x", "--config", bad]):
        rc, out, err = _run(argv[0], argv[1:], capsys)
        assert rc == 1 and str(bad) in err and "num_heads" in err, err


def test_the_installed_entry_point_exits_with_the_code(files):
    """`python -m gptoss_verify.cli` (what the console script runs) exits with main's code."""
    def status(*argv) -> int:
        return subprocess.run([sys.executable, "-m", "gptoss_verify.cli", *map(str, argv)],
                              capture_output=True, cwd=Path(__file__).resolve().parents[2]).returncode
    assert status("--help") == 0
    assert status("convert", "--no-such-option") == 2
    assert status("inspect", files.tmp / "missing") == 1


def test_building_the_parser_imports_neither_transformers_nor_triton():
    """Every command module is imported to build the parser: `commands/__init__.py` asks them to
    keep transformers and triton inside `run`."""
    code = ("import sys\n"
            "from gptoss_verify.cli import build_parser\n"
            "build_parser()\n"
            "heavy = sorted({'transformers', 'triton'} & set(sys.modules))\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
