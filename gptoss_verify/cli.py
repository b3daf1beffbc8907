"""`gptoss-verify`: build the parser from the command modules and map outcomes to exit codes.

Exit codes, for every subcommand:
    0  checked and passed
    1  checked and failed, or bad input data (one line on stderr naming file, tensor or field)
    2  usage error (argparse)
The commands live in `gptoss_verify/commands/` (see its docstring for how to add one).
"""
from __future__ import annotations

import argparse
import sys

from .commands import registered

# bad input data: the project's own errors are ValueErrors whose message names file, tensor or
# field; OSError covers a path that is missing, unreadable or in the way
INPUT_ERRORS = (ValueError, KeyError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptoss-verify", description="Check a GPT-OSS implementation, its checkpoints and its goldens.",
        epilog="exit status: 0 checked and passed; 1 checked and failed, or bad input data; 2 usage error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, mod in registered().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (argparse's 2 for a usage error, 0 for --help)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse has printed the usage and the error
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return int(args._run(args) or 0)
    except INPUT_ERRORS as err:
        msg = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
        # one line whatever the input held (a field name with a newline in it, say): escaped, not split
        msg = msg.replace("\r", "\\r").replace("\n", "\\n")
        print(f"gptoss-verify {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
