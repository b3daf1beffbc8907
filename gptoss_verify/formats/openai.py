"""OpenAI's original layout (docs/layouts.md §4), what `gpt_oss.torch` loads: `config.json` (the original
field set), `dtypes.json`, and safetensors under OpenAI's names.

One table maps names; one transform fuses q, k, v into `attn.qkv` by rows (q, then k, then v, no
permutation). Experts are MXFP4 as published: `mlp1_weight.blocks/.scales` are HF's
`gate_up_proj_blocks/_scales` byte for byte (even rows gate, odd rows up in both), `mlp2_*` are
`down_proj_*`. Writing from a dense source quantises with the OCP MX rule (lossy, and the convert
command says so). `mxfp4=False` writes dense `mlp1_weight [E,2I,H]` / `mlp2_weight [E,H,I]`, which
we read back but OpenAI's loader does not (it maps those names to blocks/scales), so the CLI never
writes it.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ConfigError, ModelSpec
from . import canonical
from .canonical import Stream, TensorTable
from ..schema import is_expert_weight
from .errors import CheckpointError
from .fileio.partials import atomic_directory
from .plausible import check_fits
from .safetensors_io import (DEFAULT_MAX_SHARD_BYTES, PlannedWriter, SafetensorsDir, TensorInfo,
                             dtype_code, plan_shards, write_json)

NAME = "openai"
CONFIG = "config.json"
DTYPES_JSON = "dtypes.json"
_ORIGINAL_KEYS = {"num_experts", "experts_per_token", "rope_scaling_factor"}

GLOBAL = {  # canonical -> OpenAI
    "model.embed_tokens.weight": "embedding.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "unembedding.weight",
}
PER_LAYER = {  # canonical suffix after model.layers.N. -> suffix after block.N.
    "input_layernorm.weight": "attn.norm.scale",
    "self_attn.sinks": "attn.sinks",
    "self_attn.o_proj.weight": "attn.out.weight",
    "self_attn.o_proj.bias": "attn.out.bias",
    "post_attention_layernorm.weight": "mlp.norm.scale",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.bias": "mlp.gate.bias",
    "mlp.experts.gate_up_proj_blocks": "mlp.mlp1_weight.blocks",
    "mlp.experts.gate_up_proj_scales": "mlp.mlp1_weight.scales",
    "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
    "mlp.experts.down_proj_blocks": "mlp.mlp2_weight.blocks",
    "mlp.experts.down_proj_scales": "mlp.mlp2_weight.scales",
    "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
    # dense experts (not published; transposed to OpenAI's [out, in])
    "mlp.experts.gate_up_proj": "mlp.mlp1_weight",
    "mlp.experts.down_proj": "mlp.mlp2_weight",
}
QKV = ("q_proj", "k_proj", "v_proj")  # fused by rows in this order into attn.qkv


def detect(path: str | Path) -> bool:
    """A directory with OpenAI's original config.json (num_experts, rope_scaling_factor, no
    model_type) and safetensors files."""
    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(cfg, dict) and _ORIGINAL_KEYS <= set(cfg) and "model_type" not in cfg
            and any(path.glob("*.safetensors")))


def read_spec(path: str | Path) -> ModelSpec:
    path = Path(path)
    try:
        return check_fits(ModelSpec.from_openai_config(path / CONFIG, name=path.name), path, path / CONFIG,
                          recursive=False)
    except ConfigError as err:
        raise CheckpointError(f"{path / CONFIG}: {err}") from None


def to_openai_name(name: str) -> str:
    if name in GLOBAL:
        return GLOBAL[name]
    _, _, layer, rest = name.split(".", 3)
    return f"block.{layer}.{PER_LAYER[rest]}"


def expected_tensors(spec: ModelSpec, mxfp4: bool = True, dtype: torch.dtype = torch.bfloat16) -> TensorTable:
    """OpenAI name -> (shape, dtype), in checkpoint order."""
    table: TensorTable = {}
    for name, (shape, dt) in canonical.canonical_table(spec, mxfp4=mxfp4, dtype=dtype).items():
        rest = name.split(".", 3)[-1]
        if rest.startswith("self_attn.") and rest.split(".")[1] in QKV:
            if rest.startswith("self_attn.q_proj"):
                layer = name.split(".")[2]
                rows = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
                kind = rest.rsplit(".", 1)[-1]
                table[f"block.{layer}.attn.qkv.{kind}"] = ((rows, *shape[1:]), dt)
            continue
        if is_expert_weight(name):  # dense [E, in, out] -> OpenAI [E, out, in]
            shape = (shape[0], shape[2], shape[1])
        table[to_openai_name(name)] = (shape, dt)
    return table


def list_tensors(path: str | Path) -> dict[str, TensorInfo]:
    return SafetensorsDir(path).tensors


def options(path: str | Path, tensors: dict[str, TensorInfo] | None = None) -> dict:
    tensors = list_tensors(path) if tensors is None else tensors
    embed = tensors.get("embedding.weight")
    return {"mxfp4": "block.0.mlp.mlp1_weight.blocks" in tensors,
            "dtype": embed.dtype if embed is not None else torch.bfloat16}


def holds_mxfp4(path: str | Path) -> bool:
    return bool(options(path)["mxfp4"])


def iter_stored(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = SafetensorsDir(path)
    for name in files.tensors:
        yield name, files.get(name)


def read(path: str | Path) -> tuple[ModelSpec, Stream]:
    """(spec, canonical stream). Headers are checked against the config before any data is read."""
    from .validate import check_table
    path = Path(path)
    spec = read_spec(path)
    files = SafetensorsDir(path)
    opts = options(path, files.tensors)
    check_table(expected_tensors(spec, **opts), files.tensors, path)
    q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim

    def stream() -> Stream:
        for name in canonical.canonical_table(spec, **opts):
            rest = name.split(".", 3)[-1]
            if rest.startswith("self_attn.") and rest.split(".")[1] in QKV:
                layer, proj, kind = name.split(".")[2], rest.split(".")[1], rest.rsplit(".", 1)[-1]
                if proj == "q_proj":
                    qkv = files.get_finite(f"block.{layer}.attn.qkv.{kind}")
                    parts = dict(zip(QKV, torch.split(qkv, [q_rows, kv_rows, kv_rows], dim=0)))
                    if kind == "weight":
                        weight_parts = parts
                    else:
                        bias_parts = parts
                yield name, ((weight_parts if kind == "weight" else bias_parts)[proj]).clone()
                continue
            tensor = files.get_finite(to_openai_name(name))
            if is_expert_weight(name):
                tensor = tensor.transpose(1, 2).contiguous()
            yield name, tensor
    return spec, stream()


def write(stream: Iterable[tuple[str, torch.Tensor]], spec: ModelSpec, out_dir: str | Path, *,
          mxfp4: bool = True, dtype: torch.dtype | None = None,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False, **_ignored) -> None:
    """Write the original layout atomically (one `model.safetensors` unless it exceeds
    `max_shard_bytes`; OpenAI's loader reads every *.safetensors file of the directory)."""
    first, stream = canonical.peek(stream)
    dtype = dtype or canonical.float_dtype_of(first)
    del first  # the stream still yields it; holding it here would keep it resident
    table = expected_tensors(spec, mxfp4=mxfp4, dtype=dtype)
    plan = plan_shards([(n, *table[n]) for n in table], max_shard_bytes,
                       lambda i, n: "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
    with atomic_directory(out_dir) as tmp:
        writer = PlannedWriter(tmp, plan, write_index=False)
        try:
            pending: dict[str, dict[str, torch.Tensor]] = {}
            items = canonical.as_form(stream, mxfp4, dtype)
            for name, tensor in tqdm(items, total=len(table) + 4 * spec.num_layers, unit="tensor",
                                     desc=f"write openai {Path(out_dir).name}", disable=None if progress else True, leave=False):
                rest = name.split(".", 3)[-1] if name.startswith("model.layers.") else ""
                if rest.startswith("self_attn.") and rest.split(".")[1] in QKV:
                    layer, proj, kind = name.split(".")[2], rest.split(".")[1], rest.rsplit(".", 1)[-1]
                    key = f"block.{layer}.attn.qkv.{kind}"
                    parts = pending.setdefault(key, {})
                    if proj in parts:
                        raise CheckpointError(f"{out_dir}: tensor {name} given twice")
                    parts[proj] = tensor
                    if len(parts) == 3:
                        del pending[key]
                        writer.put(key, torch.cat([parts[p] for p in QKV], dim=0))
                    continue
                if name not in GLOBAL and not rest:
                    raise CheckpointError(f"{out_dir}: unexpected tensor {name} (not in the OpenAI layout)")
                if is_expert_weight(name):
                    tensor = tensor.transpose(1, 2).contiguous()
                try:
                    target = to_openai_name(name)
                except KeyError:
                    raise CheckpointError(f"{out_dir}: unexpected tensor {name} (not in the OpenAI layout)") from None
                writer.put(target, tensor)
            if pending:
                key = next(iter(pending))
                raise CheckpointError(f"{out_dir}: the input stream lacks part of {key} "
                                      f"(has {sorted(pending[key])})")
            writer.finish()
        finally:
            writer.close()
        write_json(tmp / CONFIG, spec.to_openai_config())
        write_json(tmp / DTYPES_JSON, {n: _published_dtype(n, dt) for n, (_, dt) in table.items()})


def _published_dtype(name: str, dtype: torch.dtype) -> str:
    """`dtypes.json` spells MXFP4 blocks FP4 and their scales UE8, as the published file does."""
    if name.endswith(".blocks"):
        return "FP4"
    if name.endswith(".scales"):
        return "UE8"
    return dtype_code(dtype)
