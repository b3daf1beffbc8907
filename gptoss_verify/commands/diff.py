"""`gptoss-verify diff A B`: do two checkpoints hold the same model; if not, which tensor and which
transform (the library is `gptoss_verify/diff/`; `docs/diff.md`)."""
from __future__ import annotations

import argparse

NAME = "diff"
HELP = "compare two checkpoints in any layouts: same model, or which tensor differs and how"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..diff.command import add_arguments as diff_arguments
    diff_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..diff.command import run_args
    return run_args(args)
