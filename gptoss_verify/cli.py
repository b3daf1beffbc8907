"""`gptoss-verify`: one entry point, one module per subcommand.

Each module in `COMMANDS` defines `add_arguments(parser)` and `run(args) -> int` (0 ok, 1 a
check failed). Bad usage exits 2 (argparse); a bad input raises a `UserError` or one of the
project's `*Error` types, printed as one line on stderr with exit 1.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Keep imports inside modules light: transformers and
# triton are imported only when a command needs them.
COMMANDS: dict[str, tuple[str, str]] = {
    "parity": ("gptoss_verify.parity.cli", "compare our model with transformers layer by layer"),
    "golden": ("gptoss_verify.golden_cli", "regenerate the golden logits, or check ours / transformers against them"),
    "make-checkpoint": ("gptoss_verify.commands.make_checkpoint", "write a synthetic checkpoint in a published layout"),
    "inspect": ("gptoss_verify.commands.inspect_checkpoint", "detect a checkpoint's layout and check every tensor"),
    "convert": ("gptoss_verify.commands.convert_checkpoint", "convert a checkpoint between layouts"),
    "roundtrip": ("gptoss_verify.commands.roundtrip_checkpoint", "convert there and back, compare bit for bit"),
    "sharded-forward": ("gptoss_verify.distributed.cli", "run Megatron shards over torch.distributed, compare with the unsharded model"),
}


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss-verify", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (UserError, ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"gptoss-verify {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
