"""The committed goldens: ours and the oracle check clean, regeneration is byte-identical, drift
and tampering are reported."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_verify import golden

COMMITTED = golden.DEFAULT_DIR


def test_ours_checks_clean_without_transformers():
    code = ("import sys\n"
            "from gptoss_verify import golden\n"
            "results = golden.check(golden.DEFAULT_DIR, 'ours')\n"
            "assert results and all(r.passed for r in results), [r for r in results if not r.passed]\n"
            "assert 'transformers' not in sys.modules, 'checking ours imported transformers'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_oracle_checks_clean():
    results = golden.check(COMMITTED, "oracle")
    assert len(results) == len(golden.CASES)
    assert all(r.passed for r in results), [(r.case, r.measure) for r in results if not r.passed]


def test_regeneration_is_byte_identical(tmp_path):
    first, second = golden.regenerate(tmp_path / "a"), golden.regenerate(tmp_path / "b")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in COMMITTED.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_a_fault_in_ours_is_reported_with_its_case():
    results = golden.check(COMMITTED, "ours", faults=("yarn-truncate",))
    drifted = [r for r in results if not r.passed]
    assert drifted and all(r.case.endswith("float32") or "KL" in r.measure for r in drifted)
    report = golden.drift_report(results, golden.load_manifest(COMMITTED))
    assert "**DRIFT**" in report and drifted[0].case in report


def test_tampered_file_is_named(tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(COMMITTED, copy)
    victim = sorted(copy.glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(golden.GoldenError, match=victim.name):
        golden.check(copy, "ours")


def test_cli_exit_status(tmp_path):
    from gptoss_verify.cli import main
    assert main(["golden", "check", "--against", "ours", "--report", str(tmp_path / "d.md")]) == 0
    assert (tmp_path / "d.md").read_text().count("ok") == len(golden.CASES)
    (tmp_path / "empty").mkdir()
    assert main(["golden", "check", "--dir", str(tmp_path / "empty")]) == 1
