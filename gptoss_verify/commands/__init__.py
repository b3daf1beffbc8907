"""The subcommands of `gptoss-verify`, one module each, and their registry.

A command module defines four names:

    NAME = "make-checkpoint"              # what the user types
    HELP = "one line"                     # shown by `gptoss-verify --help` and atop its own --help
    def add_arguments(parser) -> None     # its options; shared ones come from `options.py`
    def run(args) -> int                  # 0 checked and passed, 1 checked and failed

Bad input data (a config, checkpoint, golden file or value that argparse cannot see) raises one of
the project's `ValueError`s (`ConfigError`, `CheckpointError`, `GoldenError`, ...) or an `OSError`,
its message naming the file, tensor or field: `gptoss_verify/cli.py` prints it as one line on
stderr and exits 1. Usage errors are argparse's (exit 2). Keep imports at module level light
(no transformers, no triton): every module is imported to build the parser.

To add a subcommand: write `commands/<name>.py` with those four names and add `"<name>"` to
`MODULES` below. `tests/foundation/test_cli_exit_codes.py` runs over this registry and fails until
the new command has its exit-code cases there (a usage error, a bad input file, a passing run).
"""
from __future__ import annotations

import importlib
from types import ModuleType

MODULES: tuple[str, ...] = (
    "parity",
    "golden",
    "make_checkpoint",
    "inspect",
    "convert",
    "roundtrip",
    "sharded_forward",
    "diff",
    "matrix",
    "case",
    "judge",
)


def registered() -> dict[str, ModuleType]:
    """Command name -> its module, in the order of `MODULES`."""
    mods = [importlib.import_module(f"{__name__}.{m}") for m in MODULES]
    return {mod.NAME: mod for mod in mods}
