"""The writers under test (issue 18): one per layout we write, each a call `(src, dst) -> exit code`
through the CLI where a command writes it (`case export` through `export_case` until its command
is registered)."""
from __future__ import annotations

from pathlib import Path

from gptoss_verify.cli import main


def _cli(make):
    return lambda src, dst: main([str(a) for a in make(src, dst)])


def _case_export(src: Path, dst: Path) -> int:
    """A case (weights from the generator, fixed ids) exported in the HF MXFP4 layout; a bad-input
    error printed and exit 1 as the CLI does."""
    import sys

    import torch

    from gptoss_verify.cli import INPUT_ERRORS

    from gptoss_verify.config import preset
    from gptoss_verify.subjects.dump import export_case
    from gptoss_verify.subjects.protocol import Case
    from gptoss_verify.weights import random_weights
    spec = preset("tiny").with_layers(2)
    ids = torch.arange(12, dtype=torch.int64).reshape(2, 6) % spec.vocab_size
    try:
        export_case(Case(spec, ids, 5, torch.bfloat16, random_weights(spec, 3, "typical", torch.float32)),
                    dst, "hf", True, 3)
    except INPUT_ERRORS as err:
        print(f"gptoss-verify case: error: {err}", file=sys.stderr)
        return 1
    return 0


#: layout -> writer
WRITERS = {
    "hf-bf16": _cli(lambda src, dst: ["convert", src, dst, "--to", "hf", "--dequantize"]),
    "hf-mxfp4": _cli(lambda src, dst: ["make-checkpoint", dst, "--mxfp4", "--layers", 2, "--max-shard-size",
                                       60_000, "--seed", 8]),
    "openai": _cli(lambda src, dst: ["convert", src, dst, "--to", "openai"]),
    "megatron": _cli(lambda src, dst: ["convert", src, dst, "--to", "megatron", "--tp", 2, "--ep", 2]),
    "megatron-dist": _cli(lambda src, dst: ["convert", src, dst, "--to", "megatron-dist"]),
    "case-export": _case_export,
}


def write(layout: str, src: Path, dst: Path) -> int:
    return WRITERS[layout](src, dst)
