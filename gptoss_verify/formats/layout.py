"""The registry of on-disk layouts: name -> module, and detection of a checkpoint's layout.

Every layout module exposes the same functions:
    detect(path) -> bool
    read(path) -> (ModelSpec, iterator of (canonical name, tensor))
    write(stream, spec, out_dir, **options) -> None        (atomic)
    expected_tensors(spec, **options) -> {name: (shape, dtype)} in the layout's own names
    read_spec(path), list_tensors(path), options(path, tensors)   (header-only inspection)
and optionally `holds_mxfp4(path)` and `iter_stored(path)` (values in the layout's own names).
Modules are imported only when needed, so a layout under construction breaks nothing else.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from .errors import CheckpointError

LAYOUTS: dict[str, str] = {
    "hf": "gptoss_verify.formats.hf",
    "openai": "gptoss_verify.formats.openai",
    "megatron": "gptoss_verify.formats.megatron.legacy",
    "megatron-dist": "gptoss_verify.formats.megatron.dist",
}
# most specific first: a Megatron root may also hold a config.json
DETECTION_ORDER = ("megatron-dist", "megatron", "openai", "hf")
MXFP4_CAPABLE = {"hf", "openai"}


def module(name: str) -> ModuleType:
    try:
        path = LAYOUTS[name]
    except KeyError:
        raise CheckpointError(f"layout: expected one of {sorted(LAYOUTS)}, got {name!r}") from None
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as err:
        if err.name == path:
            raise CheckpointError(f"layout {name}: not available in this build ({path} is missing)") from None
        raise


def available() -> list[str]:
    out = []
    for name in LAYOUTS:
        try:
            module(name)
            out.append(name)
        except CheckpointError:
            pass
    return out


def detect(path: str | Path) -> str:
    """The name of the layout that `path` holds, or a CheckpointError saying what was looked for."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
    for name in DETECTION_ORDER:
        try:
            mod = module(name)
        except CheckpointError:
            continue
        if mod.detect(path):
            return name
    raise CheckpointError(f"{path}: no known checkpoint layout (looked for {', '.join(available())}: "
                          "an HF config.json with model_type gpt_oss and *.safetensors, an OpenAI original "
                          "config.json with *.safetensors, or a Megatron checkpoint)")


def holds_mxfp4(name: str, path: str | Path) -> bool:
    mod = module(name)
    return bool(mod.holds_mxfp4(path)) if hasattr(mod, "holds_mxfp4") else False
