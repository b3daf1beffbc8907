"""pytest plugin (entry point `pytest11`): run the battery on a user's implementation in their own CI.

    pytest --gptoss-subject mypkg.engine:build

gives one test per feature probe and per trace point the subject exposes (and one for the next-token
distributions), each judged against the float64 truth with the one judge; a failing test carries
the verdict and the subject's matrix report. `MODULE:CALLABLE` is a `python:` subject (any object
following the protocol, or a callable returning one); a built-in name (`reference`, `hf-eager`, ...)
works too. Without `--gptoss-subject` the plugin adds no tests and imports nothing of the project
beyond this module (no torch), so it costs an installed environment nothing.
"""
from __future__ import annotations

import pytest

_KEY = "gptoss_verify_batteries"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gptoss", "GPT-OSS implementation checks (gptoss-verify)")
    group.addoption("--gptoss-subject", action="append", default=[], metavar="MODULE:CALLABLE",
                    help="the implementation to check (repeatable): MODULE:CALLABLE or a built-in subject name")
    group.addoption("--gptoss-dtype", action="append", default=[], metavar="DTYPE",
                    help="repeatable; default: bfloat16 where the subject runs in it, else its first precision")
    group.addoption("--gptoss-preset", default="tiny", help="model shape of the case (default tiny)")
    group.addoption("--gptoss-batch", type=int, default=8, help="sequences in the case (default 8)")
    group.addoption("--gptoss-seq", type=int, default=24, help="tokens per sequence (default 24)")
    group.addoption("--gptoss-seed", type=int, default=0, help="seed of weights and tokens (default 0)")
    group.addoption("--gptoss-device", default="cpu", help="device of the case (default cpu)")
    group.addoption("--gptoss-no-probes", action="store_true", help="trace points only")


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection, so those apply to these tests too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    names = config.getoption("gptoss_subject")
    if not names:
        return
    for collector in _collectors(session, config, names):
        items.extend(collector.collect())


class SubjectTests(pytest.Collector):
    """The tests of one subject in one dtype."""

    def __init__(self, *, battery, **kwargs):
        super().__init__(**kwargs)
        self.battery = battery

    def collect(self):
        return [CellTest.from_parent(self, name=cell, cell=cell) for cell in self.battery.cell_names()]


class CellTest(pytest.Item):
    """One probe or one trace point of a subject, judged against the float64 truth."""

    def __init__(self, *, cell: str, **kwargs):
        super().__init__(**kwargs)
        self.cell = cell

    def runtest(self) -> None:
        outcome = self.parent.battery.outcome(self.cell)
        if outcome.status == "skipped":
            pytest.skip(outcome.message)
        if outcome.status == "failed":
            self.add_report_section("call", "gptoss-verify report", self.parent.battery.report())
            raise CellFailed(outcome.message)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CellFailed):
            return f"{excinfo.value}\n(the subject's report is attached below; docs/subjects.md explains each cell)"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"gptoss {self.parent.name}::{self.cell}"


class CellFailed(AssertionError):
    """A cell's verdict is FAIL (its message is the verdict)."""


def _collectors(session: pytest.Session, config: pytest.Config, names: list[str]) -> list:
    from .config import preset
    from .dtypes import DTYPES
    from .subjects.battery import Battery, subject_name
    from .subjects.protocol import Case, SubjectUnavailable
    from .subjects.registry import resolve

    opt = config.getoption
    spec = preset(opt("gptoss_preset"))
    out = []
    for name in names:
        try:
            subject = resolve(subject_name(name))
        except (SubjectUnavailable, ValueError) as err:
            raise pytest.UsageError(f"--gptoss-subject {name}: {err}") from None
        for dtype in opt("gptoss_dtype") or Battery.default_dtypes(subject):
            if dtype not in DTYPES:
                raise pytest.UsageError(f"--gptoss-dtype {dtype}: expected one of {', '.join(DTYPES)}")
            case = Case.random(spec, DTYPES[dtype], opt("gptoss_batch"), opt("gptoss_seq"), 0, opt("gptoss_seed"),
                               opt("gptoss_device"))
            battery = Battery(name, case, with_probes=not opt("gptoss_no_probes"), subject=subject)
            label = f"gptoss[{name}-{dtype}]"
            out.append(SubjectTests.from_parent(session, name=label, nodeid=label, battery=battery))
    return out
