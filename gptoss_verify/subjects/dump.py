"""Out-of-process engines: a self-contained case on disk, the engine's safetensors dump judged.

`export_case(case, out_dir, layout, mxfp4)` writes `checkpoint/` (any layout we write, bf16 or
MXFP4 experts), `inputs.safetensors` (`input_ids` [B, S] int64, `positions` [B, S] int64) and
`manifest.json` (versions, spec, dtype, seed, sha256 of every file), atomically. The engine runs it
and writes a safetensors file holding `logits` [B, S, V] and any trace points under our names;
`judge_dump(case_dir, dump)` checks and judges it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..config import unique_keys
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
        if mxfp4 and layout not in layouts.MXFP4_CAPABLE:
            raise SubjectError(f"case export: the {layout} layout holds no MXFP4 experts "
                               f"(MXFP4 layouts: {', '.join(sorted(layouts.MXFP4_CAPABLE))})")
        # MXFP4 experts are copied as they are (byte for byte); dense ones decoded exactly
        stream = iter(case.state.items()) if mxfp4 and case.state is not None else iter(case.dense_state().items())
        layouts.module(layout).write(stream, case.spec, tmp / CHECKPOINT, mxfp4=mxfp4, dtype=case.dtype)
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


CASE_DTYPES = ("bfloat16", "float32", "float16")


def _field(manifest: dict, path: Path, key: str, kind, check=lambda v: True, expected: str = ""):
    """One manifest field of the given type (bool is not an int here) passing `check`."""
    value = manifest.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool) or not check(value):
        raise SubjectError(f"{path}: {key}: expected {expected or getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def read_manifest(case_dir: str | Path) -> dict:
    """An exported case's manifest, every field the readers use checked (one SubjectError naming
    the field), and every file of the case listed with its sha256 and matching it."""
    case_dir = Path(case_dir)
    path = case_dir / MANIFEST
    try:
        manifest = json.loads(path.read_bytes(), object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise SubjectError(f"{case_dir}: no {MANIFEST} (not a case written by `case export`)") from None
    except (OSError, ValueError) as err:
        raise SubjectError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise SubjectError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    _field(manifest, path, "format", int, lambda v: v == FORMAT_VERSION, f"{FORMAT_VERSION}")
    _field(manifest, path, "spec", dict, expected="an object")
    _field(manifest, path, "dtype", str, lambda v: v in CASE_DTYPES, f"one of {list(CASE_DTYPES)}")
    _field(manifest, path, "offset", int, lambda v: v >= 0, "an integer >= 0")
    for key in ("batch", "seq"):
        _field(manifest, path, key, int, lambda v: v >= 1, "a positive integer")
    digests = _field(manifest, path, "sha256", dict, expected="an object: file -> sha256")
    files = {str(p.relative_to(case_dir)) for p in case_dir.rglob("*") if p.is_file() and p != path}
    for rel, digest in digests.items():
        if rel not in files:
            raise SubjectError(f"{path}: sha256: names {rel!r}, which is not a file of the case")
        if not isinstance(digest, str) or _sha256(case_dir / rel) != digest:
            raise SubjectError(f"{case_dir / rel}: sha256 differs from the manifest's (the case was modified)")
    unlisted = sorted(files - set(digests))
    if unlisted:
        raise SubjectError(f"{case_dir / unlisted[0]}: not listed in {MANIFEST}'s sha256 (the case was modified)")
    return manifest


def load_case(case_dir: str | Path) -> Case:
    """The case an exported directory holds (every file checked against the manifest's sha256s,
    the spec against the checkpoint's, the inputs against the manifest's shape)."""
    from ..config import ConfigError, ModelSpec
    from ..formats import layout as layouts
    case_dir = Path(case_dir)
    manifest = read_manifest(case_dir)
    try:
        spec = ModelSpec.from_json(manifest["spec"])
    except (ConfigError, TypeError) as err:
        raise SubjectError(f"{case_dir / MANIFEST}: spec: {err}") from None
    checkpoint = case_dir / CHECKPOINT
    stored = layouts.module(layouts.detect(checkpoint)).read_spec(checkpoint)
    if dataclasses.replace(stored, name="") != dataclasses.replace(spec, name=""):
        raise SubjectError(f"{case_dir / MANIFEST}: spec differs from the checkpoint's config ({checkpoint})")
    try:
        inputs = load_file(str(case_dir / INPUTS))
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise SubjectError(f"{case_dir / INPUTS}: not a readable safetensors file ({err})") from None
    ids = inputs.get("input_ids")
    shape = [manifest["batch"], manifest["seq"]]
    if ids is None or ids.dtype != torch.int64 or list(ids.shape) != shape:
        got = "none" if ids is None else f"{ids.dtype} {list(ids.shape)}"
        raise SubjectError(f"{case_dir / INPUTS}: input_ids: expected int64 {shape}, got {got}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= spec.vocab_size):
        raise SubjectError(f"{case_dir / INPUTS}: input_ids: expected ids in [0, {spec.vocab_size}), "
                           f"got [{int(ids.min())}, {int(ids.max())}]")
    return Case(spec, ids, manifest["offset"], getattr(torch, manifest["dtype"]), checkpoint=checkpoint)


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

