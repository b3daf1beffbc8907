"""The pytest plugin on an implementation written outside the project (`someone_elses_engine.py`):
one test per point and probe, the verdict its bug deserves, our report attached; inert without
its option."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gptoss_verify.subjects.battery import probe_names

# probes that say nothing about a float32 subject without decode(): skipped, not passed
NOT_APPLICABLE_F32 = {"norm-cast-order", "decode"} & set(probe_names())

pytest_plugins = ("pytester",)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SMALL = ("--gptoss-dtype", "float32", "--gptoss-batch", "2", "--gptoss-seq", "20")


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """pytester's in-process runs drop the modules first imported inside them when they end; torch's
    and triton's (nanobind) do not survive being imported twice. Judging a subject once here first
    imports them all in this process, so the runs below find them already there."""
    import torch

    from gptoss_verify.config import preset
    from gptoss_verify.subjects.battery import Battery
    from gptoss_verify.subjects.protocol import Case
    Battery("reference", Case.random(preset("tiny"), torch.float32, 1, 4), with_probes=True).report()


def plugin_args() -> list[str]:
    """Load the plugin as a user's pytest would: by its pytest11 entry point where the package is
    installed (CI: `pip install -e`), else by name (a checkout run with PYTHONPATH); loading it both
    ways is pytest's "already registered under a different name" error."""
    installed = any(e.name == "gptoss_verify" for e in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", "gptoss_verify.pytest_plugin"]


def run(pytester, *args):
    pytester.syspathinsert(HERE)  # the user's engine module, importable as in their own CI
    pytester.makepyfile(test_own="def test_their_own():\n    assert True\n")
    return pytester.runpytest_inprocess(*plugin_args(), "-p", "no:cacheprovider", *args)


def test_inert_without_the_option(pytester):
    result = run(pytester)
    result.assert_outcomes(passed=1)  # the user's own test, nothing added
    code = "import sys, gptoss_verify.pytest_plugin as p; assert not {'torch', 'gptoss_verify.subjects'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_registered_as_a_pytest11_entry_point():
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]
    assert entry == {"gptoss_verify": "gptoss_verify.pytest_plugin"}


def test_a_correct_engine_passes_every_test(pytester):
    result = run(pytester, "--gptoss-subject", "someone_elses_engine:build_with_points", *SMALL, "-v")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and "error" not in outcomes, result.stdout.str()
    out = result.stdout.str()
    for cell in ("layers.0.attn_core", "layers.3.topk_idx", "logits", "next-token"):  # one test per point
        assert f"gptoss[someone_elses_engine:build_with_points-float32]::{cell} PASSED" in out, out
    # own test, 2 points × 4 layers, logits, next-token, the probes but the two that do not apply to
    # a float32 engine without a KV cache (the norm cast order, decode), which are skipped saying so
    assert outcomes["passed"] == 1 + 2 * 4 + 2 + len(probe_names()) - len(NOT_APPLICABLE_F32)
    assert outcomes.get("skipped", 0) == len(NOT_APPLICABLE_F32)


def test_sinks_ignored_fails_at_attention_with_the_report_attached(pytester):
    result = run(pytester, "--gptoss-subject", "someone_elses_engine:build_sinks_ignored_with_points", *SMALL)
    out = result.stdout.str()
    failed = {line.split("::")[-1].split()[0] for line in out.splitlines() if line.startswith("FAILED gptoss[")}
    assert {"layers.0.attn_core", "next-token"} <= failed, out
    assert "layers.0.attn_core: FAIL truth (float32, truth, rel max)" in out, out  # the verdict of the test
    assert "- someone-else (sinks-ignored) layers.0.attn_core: FAIL truth" in out  # and in the attached report
    assert "gptoss-verify report" in out and "| someone-else (sinks-ignored) | **FAIL** |" in out
    if probe_names():  # logits alone name the feature
        assert any(name.startswith("probe:") and "sink" in name for name in failed), failed


def test_logits_only_engine_through_the_plugin(pytester):
    """Logits only: judged on the distributions (its routing flips are unknown), logits skipped with why."""
    good = run(pytester, "--gptoss-subject", "someone_elses_engine:build", *SMALL, "-rs")
    good.assert_outcomes(passed=2 + len(probe_names()) - len(NOT_APPLICABLE_F32), skipped=1 + len(NOT_APPLICABLE_F32))
    assert "exposes no topk_idx" in good.stdout.str()
    if probe_names():
        assert "probe decode (feature: KV-cache decode) not applicable" in good.stdout.str()
    bad = run(pytester, "--gptoss-subject", "someone_elses_engine:build_sinks_ignored", *SMALL, "-k", "next")
    bad.assert_outcomes(failed=1, deselected=2 + len(probe_names()))  # -k applies to the plugin's tests too (and to the user's)
    assert "FAIL free-logits (float32, truth, median KL)" in bad.stdout.str()


def test_a_subject_that_cannot_be_imported_is_a_usage_error(pytester):
    result = run(pytester, "--gptoss-subject", "no_such_engine_module:build")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "no_such_engine_module" in result.stderr.str()
