"""Out-of-process engines: a self-contained case on disk, the engine's safetensors dump judged.

`export_case(case, out_dir, layout, mxfp4)` writes `checkpoint/` (any layout we write, bf16 or
MXFP4 experts), `inputs.safetensors` (`input_ids` [B, S] int64, `positions` [B, S] int64) and
`manifest.json` (versions, spec, dtype, seed, sha256 of every file), atomically. The engine runs it
and writes a safetensors file holding `logits` [B, S, V] and any trace points under our names;
`judge_dump(case_dir, dump)` checks and judges it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .protocol import Case, SubjectError, validate_output, split_name

MANIFEST, INPUTS, CHECKPOINT = "manifest.json", "inputs.safetensors", "checkpoint"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_case(case: Case, out_dir: str | Path, layout: str = "hf", mxfp4: bool = False, seed: int | None = None) -> Path:
    """Write the case as a directory an engine can run without us (temp name, then rename)."""
    import gptoss_verify
    from ..formats import layout as layouts
    from ..formats.fileio.partials import atomic_directory, open_output
    from ..formats.safetensors_io import write_json
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        state = case.dense_state()
        layouts.module(layout).write(iter(state.items()), case.spec, tmp / CHECKPOINT, mxfp4=mxfp4, dtype=case.dtype)
        inputs = save({"input_ids": case.input_ids.to(torch.int64).contiguous(),
                       "positions": case.positions().to(torch.int64).contiguous()})
        with open_output(tmp / INPUTS) as f:  # our own write call: its errors name the file
            f.write(inputs)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT_VERSION, "gptoss_verify": getattr(gptoss_verify, "__version__", "unknown"),
            "torch": torch.__version__, "spec": case.spec.to_json(), "dtype": case.dtype_name,
            "layout": layout, "mxfp4": mxfp4, "seed": seed, "offset": case.offset,
            "batch": int(case.input_ids.shape[0]), "seq": int(case.input_ids.shape[1]),
            "dump": {"file": "safetensors", "required": ["logits"], "logits_shape": [
                int(case.input_ids.shape[0]), int(case.input_ids.shape[1]), case.spec.vocab_size]},
            "sha256": {str(p.relative_to(tmp)): _sha256(p) for p in files},
        }
        write_json(tmp / MANIFEST, manifest)
    return out_dir


def load_case(case_dir: str | Path) -> Case:
    """The case an exported directory holds (its checkpoint checked against the manifest's sha256s)."""
    from ..config import ModelSpec
    case_dir = Path(case_dir)
    try:
        manifest = json.loads((case_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise SubjectError(f"{case_dir}: no {MANIFEST} (not a case written by `case export`)") from None
    for rel, digest in manifest["sha256"].items():
        if _sha256(case_dir / rel) != digest:
            raise SubjectError(f"{case_dir / rel}: sha256 differs from the manifest's (the case was modified)")
    inputs = load_file(str(case_dir / INPUTS))
    return Case(ModelSpec.from_json(manifest["spec"]), inputs["input_ids"], int(manifest["offset"]),
                getattr(torch, manifest["dtype"]), checkpoint=case_dir / CHECKPOINT)


def read_dump(dump: str | Path, case: Case):
    """The engine's dump as a validated Output (one SubjectError naming the field otherwise)."""
    dump = Path(dump)
    try:
        tensors = load_file(str(dump))
    except FileNotFoundError:
        raise SubjectError(f"{dump}: no such dump file") from None
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise SubjectError(f"{dump}: not a readable safetensors file ({err})") from None
    return validate_output(tensors, case, where=f"dump {dump}")


def judge_dump(case_dir: str | Path, dump: str | Path, name: str = "engine"):
    from .judging import judge_output
    case = load_case(case_dir)
    output = read_dump(dump, case)
    points = tuple(dict.fromkeys(["logits", *(split_name(n)[1] for n in output.points)]))
    return judge_output(output, case, points, name)


# ---- commands (wired into the CLI by the coordinator) --------------------------------------------
def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="directory to write the case into (must not exist)")
    parser.add_argument("--preset", default="tiny", help="model shape (config preset)")
    parser.add_argument("--layout", default="hf", help="checkpoint layout: hf, openai, megatron, ...")
    parser.add_argument("--mxfp4", action="store_true", help="MXFP4 experts (else dense)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)


def run_export(args: argparse.Namespace) -> int:
    from ..config import preset
    from ..weights import random_weights
    spec = preset(args.preset)
    dtype = getattr(torch, args.dtype)
    ids = torch.randint(0, spec.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed + 1))
    case = Case(spec, ids, args.offset, dtype, random_weights(spec, args.seed, "typical", torch.float32))
    export_case(case, args.out_dir, args.layout, args.mxfp4, args.seed)
    print(f"wrote case {args.out_dir}")
    return 0


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("case_dir", help="a directory written by `case export`")
    parser.add_argument("dump", help="the engine's safetensors dump (logits plus any trace points)")
    parser.add_argument("--name", default="engine", help="the subject's name in the report")


def run_judge(args: argparse.Namespace) -> int:
    try:
        verdict = judge_dump(args.case_dir, args.dump, args.name)
    except SubjectError as err:
        print(f"error: {err}")
        return 1
    for cell in verdict.cells:
        print(f"{cell.name}: {cell.verdict}")
    print("PASS" if verdict.passed else f"FAIL at {verdict.first_failure.name}")
    return 0 if verdict.passed else 1
