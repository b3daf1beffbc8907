"""The Hugging Face layout (docs/layouts.md §2): `config.json` plus safetensors shards under HF names.

Experts are either MXFP4 (`*_blocks`/`*_scales` U8, as openai/gpt-oss-20b and -120b are published,
with `quantization_config.quant_method = "mxfp4"` in config.json) or dense in the HF module layout
(`gate_up_proj [E,H,2I]`, `down_proj [E,I,H]`, as the bf16 re-uploads hold them). Every other tensor
is in one float dtype (BF16 when published). Shards are named as the published ones
(`model-00000-of-00002.safetensors` ... counted from 0) with a `model.safetensors.index.json`;
the embedding, final norm and lm_head go last, as published.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ConfigError, ModelSpec
from . import canonical
from .canonical import Stream, TensorTable
from .errors import CheckpointError
from .fileio.partials import atomic_directory
from .plausible import check_fits
from .safetensors_io import (DEFAULT_MAX_SHARD_BYTES, PlannedWriter, SafetensorsDir, TensorInfo,
                             hf_shard_name, plan_shards, write_json)

NAME = "hf"
CONFIG = "config.json"
_PROBE = "model.layers.0.mlp.experts.gate_up_proj_blocks"


def detect(path: str | Path) -> bool:
    """A directory with a transformers GPT-OSS config.json and safetensors files at its top level."""
    path = Path(path)
    cfg = _config_dict(path) if (path / CONFIG).is_file() else None
    if not cfg or not (cfg.get("model_type") == "gpt_oss" or "GptOssForCausalLM" in cfg.get("architectures", [])):
        return False
    return any(path.glob("*.safetensors"))


def _config_dict(path: Path) -> dict | None:
    try:
        data = json.loads((path / CONFIG).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def read_spec(path: str | Path) -> ModelSpec:
    path = Path(path)
    try:
        return check_fits(ModelSpec.from_hf_config(path / CONFIG, name=path.name), path, path / CONFIG, recursive=False)
    except ConfigError as err:
        raise CheckpointError(f"{path / CONFIG}: {err}") from None


def expected_tensors(spec: ModelSpec, mxfp4: bool = False, dtype: torch.dtype = torch.bfloat16) -> TensorTable:
    """Every tensor name -> (shape, dtype) the config implies (the canonical table itself)."""
    return canonical.canonical_table(spec, mxfp4=mxfp4, dtype=dtype)


def list_tensors(path: str | Path) -> dict[str, TensorInfo]:
    """Header-only listing of what the files hold."""
    return SafetensorsDir(path).tensors


def options(path: str | Path, tensors: dict[str, TensorInfo] | None = None) -> dict:
    """The `expected_tensors` options that describe this checkpoint (MXFP4 or dense; float dtype)."""
    tensors = list_tensors(path) if tensors is None else tensors
    embed = tensors.get("model.embed_tokens.weight")
    _check_quantization(Path(path))
    return {"mxfp4": _PROBE in tensors, "dtype": embed.dtype if embed is not None else torch.bfloat16}


def _check_quantization(path: Path) -> None:
    """`quantization_config`, where there is one, must name MXFP4: the one quantisation of GPT-OSS
    we read (transformers would hand any other quant_method to another quantizer)."""
    quant = (_config_dict(path) or {}).get("quantization_config")
    if quant is None:
        return
    if not isinstance(quant, dict):
        raise CheckpointError(f"{path / CONFIG}: quantization_config: expected an object, got {quant!r}")
    method = quant.get("quant_method")
    if method != "mxfp4":
        raise CheckpointError(f"{path / CONFIG}: quantization_config.quant_method: expected 'mxfp4', got {method!r}")


def holds_mxfp4(path: str | Path) -> bool:
    return _PROBE in list_tensors(path)


def read(path: str | Path) -> tuple[ModelSpec, Stream]:
    """(spec, canonical stream in checkpoint order). Checks every header against the config first,
    so a missing, extra, mis-shaped or mis-typed tensor fails before any data is read."""
    from .validate import check_table  # validate imports the layouts; import late
    path = Path(path)
    spec = read_spec(path)
    files = SafetensorsDir(path)
    opts = options(path, files.tensors)
    expected = expected_tensors(spec, **opts)
    check_table(expected, files.tensors, path)

    def stream() -> Stream:
        for name in expected:
            yield name, files.get_finite(name)
    return spec, stream()


def write(stream: Iterable[tuple[str, torch.Tensor]], spec: ModelSpec, out_dir: str | Path, *,
          mxfp4: bool = False, dtype: torch.dtype | None = None,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False, **_ignored) -> None:
    """Write an HF checkpoint atomically. `mxfp4`: experts as blocks/scales (MXFP4 input is copied
    byte for byte, dense input is quantised with the OCP rule); otherwise dense (MXFP4 input is
    decoded exactly). `dtype`: of the float tensors, by default the stream's own."""
    first, stream = canonical.peek(stream)
    dtype = dtype or canonical.float_dtype_of(first)
    del first  # the stream still yields it; holding it here would keep it resident
    table = expected_tensors(spec, mxfp4=mxfp4, dtype=dtype)
    last = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    order = [n for n in table if n not in last] + list(last)
    plan = plan_shards([(n, *table[n]) for n in order], max_shard_bytes, hf_shard_name)
    with atomic_directory(out_dir) as tmp:
        writer = PlannedWriter(tmp, plan)
        try:
            items = canonical.as_form(stream, mxfp4, dtype)
            for name, tensor in tqdm(items, total=len(table), desc=f"write hf {Path(out_dir).name}",
                                     unit="tensor", disable=None if progress else True, leave=False):
                writer.put(name, tensor)
            writer.finish()
        finally:
            writer.close()
        write_json(tmp / CONFIG, spec.to_hf_config(mxfp4=mxfp4))
