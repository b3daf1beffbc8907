"""Megatron's `torch_dist` layout (the default of Megatron-LM and Megatron-Bridge), SPEC.md §8.

    <root>/latest_checkpointed_iteration.txt          ("0")
    <root>/iter_0000000/.metadata, __0_0.distcp       (torch.distributed.checkpoint)
    <root>/iter_0000000/metadata.json                 {"sharded_backend": "torch_dist", ...}
    <root>/gptoss_verify_megatron.json                (our sidecar: spec, padding, the tp/ep/pp asked for)

Tensors are global and layout-independent, as Megatron-Bridge saves GPT-OSS: the layer index
leaves the key and becomes a leading axis of size L, the expert index a second axis
(`decoder.layers.mlp.experts.experts.linear_fc1.weight` [L, E, 2I, H] as [gate; up] rows), QKV
grouped per KV group, the vocabulary padded to Vp rows when asked. Per-layer slices are cut by
the legacy layout's own plan at tp = ep = pp = 1 (`megatron.rank_plan`), so both layouts share
one statement of the rules.

Written in one process without a process group (`dcp.save(..., no_dist=True)`): the writer holds
the global tensors in memory (torch's FileSystemWriter keeps every tensor of a file until the
file is done). Read region by region through a load planner: one layer of one key at a time.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from tqdm import tqdm

from ..config import ConfigError, ModelSpec
from ..weights import canonical_names
from .canonical import Stream, TensorTable
from .errors import CheckpointError
from .megatron import ITERATION, SIDECAR, TRACKER, Layout, Piece, _find_meta, rank_plan
from .megatron_source import Source, open_source
from .safetensors_io import atomic_directory, write_json

NAME = "megatron-dist"
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")

# global key -> the per-layer (legacy, tp=ep=pp=1) name it stacks; "{e}" marks the expert axis
LAYER_KEYS = {
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": "self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.self_attention.linear_qkv.weight": "self_attention.linear_qkv.weight",
    "decoder.layers.self_attention.linear_qkv.bias": "self_attention.linear_qkv.bias",
    "decoder.layers.self_attention.linear_proj.weight": "self_attention.linear_proj.weight",
    "decoder.layers.self_attention.linear_proj.bias": "self_attention.linear_proj.bias",
    "decoder.layers.self_attention.core_attention.softmax_offset": "self_attention.core_attention.softmax_offset",
    "decoder.layers.pre_mlp_layernorm.weight": "pre_mlp_layernorm.weight",
    "decoder.layers.mlp.router.weight": "mlp.router.weight",
    "decoder.layers.mlp.router.bias": "mlp.router.bias",
    "decoder.layers.mlp.experts.experts.linear_fc1.weight": "mlp.experts.linear_fc1.weight{e}",
    "decoder.layers.mlp.experts.experts.linear_fc1.bias": "mlp.experts.linear_fc1.bias{e}",
    "decoder.layers.mlp.experts.experts.linear_fc2.weight": "mlp.experts.linear_fc2.weight{e}",
    "decoder.layers.mlp.experts.experts.linear_fc2.bias": "mlp.experts.linear_fc2.bias{e}",
}
GLOBAL_KEYS = {"embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
               "decoder.final_layernorm.weight": "decoder.final_layernorm.weight",
               "output_layer.weight": "output_layer.weight"}


def _flat(spec: ModelSpec, pad_vocab: bool, tp: int) -> tuple[Layout, dict]:
    """The unsharded plan (tp=ep=pp=1) with the vocabulary padded as `tp` would pad it."""
    lay = Layout(1, 1, 1, False)
    plan = rank_plan(spec, lay, 0, 0, 0)
    vp = Layout(tp, 1, 1, pad_vocab).vocab(spec)
    if vp != spec.vocab_size:
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            shape, recipe, varies_with = plan[name]

            def padded(src: Source, recipe=recipe) -> torch.Tensor:
                t = recipe(src)
                return torch.cat([t, t.new_zeros(vp - t.shape[0], t.shape[1])])
            plan[name] = Piece((vp, shape[1]), padded, varies_with)
    return lay, plan


def expected_tensors(spec: ModelSpec, tp: int = 1, ep: int = 1, pp: int = 1, pad_vocab: bool = False,
                     dtype: torch.dtype = torch.bfloat16, **_ignored) -> TensorTable:
    """Global key -> (global shape, dtype)."""
    Layout(tp, ep, pp, pad_vocab).check(spec)
    _, plan = _flat(spec, pad_vocab, tp)
    table: TensorTable = {"embedding.word_embeddings.weight": (plan["embedding.word_embeddings.weight"].shape, dtype)}
    L, E = spec.num_layers, spec.num_experts
    for key, name in LAYER_KEYS.items():
        shape = plan["decoder.layers.0." + name.format(e=0)].shape
        table[key] = (((L, E) if "{e}" in name else (L,)) + tuple(shape), dtype)
    for key in ("decoder.final_layernorm.weight", "output_layer.weight"):
        table[key] = (plan[GLOBAL_KEYS[key]].shape, dtype)
    return table


# ---- writing ------------------------------------------------------------------------------------
def write(stream: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor] | Source, spec: ModelSpec,
          out_dir: str | Path, *, tp: int = 1, ep: int = 1, pp: int = 1, pad_vocab: bool = False,
          progress: bool = False, **_ignored) -> None:
    """Write the torch_dist layout atomically. Accepts what `megatron.write` accepts (a canonical
    stream, dense or MXFP4, or a mapping). tp/ep/pp only decide the vocabulary padding (and are
    recorded): the tensors themselves are global."""
    lay = Layout(tp, ep, pp, pad_vocab)
    lay.check(spec)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        src = open_source(stream, out_dir.parent)
        try:
            _, plan = _flat(spec, pad_vocab, tp)
            dtype = src.dtype
            state: dict[str, torch.Tensor] = {}
            L, E = spec.num_layers, spec.num_experts
            bar = tqdm(total=len(GLOBAL_KEYS) + len(LAYER_KEYS) * L, desc=f"write megatron-dist {out_dir.name}",
                       unit="tensor", disable=not progress, leave=False)
            for key, name in GLOBAL_KEYS.items():
                state[key] = plan[name].recipe(src).to(dtype)
                bar.update()
            for key, name in LAYER_KEYS.items():
                first_shape = plan["decoder.layers.0." + name.format(e=0)].shape
                lead = (L, E) if "{e}" in name else (L,)
                out = torch.empty(lead + tuple(first_shape), dtype=dtype)
                for layer in range(L):
                    pre = f"decoder.layers.{layer}."
                    if "{e}" in name:
                        for e in range(E):
                            out[layer, e] = plan[pre + name.format(e=e)].recipe(src)
                    else:
                        out[layer] = plan[pre + name].recipe(src)
                    bar.update()
                state[key] = out
            bar.close()
        finally:
            src.close()
        iter_dir = tmp / f"iter_{ITERATION:07d}"
        iter_dir.mkdir()
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(iter_dir), single_file_per_rank=True,
                                                                 thread_count=1), no_dist=True)
        del state
        write_json(iter_dir / "metadata.json", MEGATRON_METADATA)
        (tmp / TRACKER).write_text(f"{ITERATION}\n")
        side = {"format": "megatron-torch_dist", "written_by": "gptoss-verify", "spec": spec.to_json(),
                "tp": tp, "ep": ep, "pp": pp, "etp": 1, "pad_vocab": pad_vocab, "vocab_size": spec.vocab_size,
                "padded_vocab_size": lay.vocab(spec), "dtype": str(dtype).removeprefix("torch."),
                "iteration": ITERATION}
        write_json(tmp / SIDECAR, side)


# ---- reading ------------------------------------------------------------------------------------
def _iter_dir(root: Path) -> Path | None:
    def is_dist(d: Path) -> bool:
        md = d / "metadata.json"
        if not (d / ".metadata").is_file() or not md.is_file():
            return False
        try:
            return json.loads(md.read_text()).get("sharded_backend") == "torch_dist"
        except ValueError:
            return False
    if is_dist(root):
        return root
    tracker = root / TRACKER
    if tracker.is_file():
        value = tracker.read_text().strip()
        cand = root / ("release" if value == "release" else f"iter_{int(value):07d}" if value.isdigit() else value)
        if is_dist(cand):
            return cand
    for cand in sorted((c for c in root.iterdir() if c.is_dir() and c.name.startswith("iter_")), reverse=True):
        if is_dist(cand):
            return cand
    return None


def detect(path: str | Path) -> bool:
    path = Path(path)
    try:
        return path.is_dir() and _iter_dir(path) is not None
    except (OSError, ValueError):
        return False


def _meta(root: Path, iter_dir: Path) -> dict:
    return _find_meta(root, iter_dir) or {}


def read_spec(path: str | Path) -> ModelSpec:
    return _open(path)[1]


def _open(path: str | Path):
    root = Path(path)
    iter_dir = _iter_dir(root) if root.is_dir() else None
    if iter_dir is None:
        raise CheckpointError(f"{root}: no torch_dist checkpoint (.metadata with metadata.json "
                              "sharded_backend torch_dist) found")
    meta = _meta(root, iter_dir)
    if "spec" in meta:
        try:
            spec = ModelSpec.from_json(meta["spec"])
        except (ConfigError, TypeError) as err:
            raise CheckpointError(f"{root / SIDECAR}: spec: {err}") from None
    else:
        for cand in (root / "config.json", iter_dir / "config.json"):
            if cand.is_file():
                try:
                    spec = ModelSpec.from_hf_config(cand, name=root.name)
                except ConfigError as err:
                    raise CheckpointError(f"{cand}: {err}") from None
                break
        else:
            raise CheckpointError(f"{root}: no {SIDECAR} and no HF config.json beside the torch_dist checkpoint: "
                                  "the model's hyperparameters cannot be read from the tensors alone")
    reader = dcp.FileSystemReader(str(iter_dir))
    try:
        md = reader.read_metadata()
    except Exception as err:  # torch raises several types for a corrupt .metadata
        raise CheckpointError(f"{iter_dir / '.metadata'}: cannot read ({err})") from None
    return root, spec, iter_dir, reader, md, meta


def list_tensors(path: str | Path) -> dict:
    _, _, iter_dir, _, md, _ = _open(path)
    out = {}
    for key, item in md.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata) and key.startswith(_MODEL_PREFIXES) and not key.endswith("_extra_state"):
            out[key] = _Info(tuple(item.size), item.properties.dtype, iter_dir)
    return out


class _Info:
    def __init__(self, shape, dtype, file):
        self.shape, self.dtype, self.file = shape, dtype, file


def options(path: str | Path, tensors=None) -> dict:
    _, spec, _, _, md, meta = _open(path)
    emb = md.state_dict_metadata.get("embedding.word_embeddings.weight")
    vp = emb.size[0] if isinstance(emb, TensorStorageMetadata) else spec.vocab_size
    tp = int(meta.get("tp", 1))
    pad = bool(meta.get("pad_vocab", vp != spec.vocab_size))
    if vp != Layout(tp, 1, 1, pad).vocab(spec):  # no sidecar: find the tp whose padding gives vp
        tp = next((t for t in (1, 2, 4, 8, 16) if Layout(t, 1, 1, True).vocab(spec) == vp), tp)
    dtype = emb.properties.dtype if isinstance(emb, TensorStorageMetadata) else torch.bfloat16
    return {"tp": tp, "ep": int(meta.get("ep", 1)), "pp": int(meta.get("pp", 1)), "pad_vocab": pad, "dtype": dtype}


class _RegionPlanner(DefaultLoadPlanner):
    """Loads given regions (offsets, sizes) of global tensors into tensors of the region's shape."""

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, (offsets, sizes) in self.regions.items():
            md = self.metadata.state_dict_metadata[fqn]
            items += create_read_items_for_chunk_list(
                fqn, md, [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))])
        self.plan = LoadPlan(items)
        return self.plan

    def lookup_tensor(self, index):
        return self.state_dict[index.fqn]


def _load_region(iter_dir: Path, key: str, item: TensorStorageMetadata, offsets, sizes) -> torch.Tensor:
    dest = torch.empty(tuple(sizes), dtype=item.properties.dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({key: dest}, storage_reader=dcp.FileSystemReader(str(iter_dir)),
                     planner=_RegionPlanner({key: (tuple(offsets), tuple(sizes))}), no_dist=True)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{iter_dir}: cannot read tensor {key} ({str(err).splitlines()[0] if str(err) else err!r})") from None
    return dest


def read(path: str | Path) -> tuple[ModelSpec, Stream]:
    """(spec, canonical dense stream). The metadata is checked strictly first (missing, extra,
    shape, dtype); values are then read one layer of one key at a time."""
    root, spec, iter_dir, _, md, _ = _open(path)
    opts = options(path)
    expected = expected_tensors(spec, **opts)
    items = md.state_dict_metadata
    for key, (shape, dtype) in expected.items():
        item = items.get(key)
        if item is None:
            raise CheckpointError(f"{iter_dir}: missing tensor {key} (expected {dtype} {list(shape)})")
        if not isinstance(item, TensorStorageMetadata) or tuple(item.size) != tuple(shape) or item.properties.dtype != dtype:
            got = f"{item.properties.dtype} {list(item.size)}" if isinstance(item, TensorStorageMetadata) else "an object"
            raise CheckpointError(f"{iter_dir}: tensor {key}: expected {dtype} {list(shape)}, got {got}")
    for key, item in items.items():
        if key.startswith(_MODEL_PREFIXES) and not key.endswith("_extra_state") and key not in expected:
            raise CheckpointError(f"{iter_dir}: unexpected tensor {key}")
    return spec, _stream(spec, iter_dir, items)


def _stream(spec: ModelSpec, iter_dir: Path, items) -> Iterator[tuple[str, torch.Tensor]]:
    h, d, qpk, inter = spec.hidden_size, spec.head_dim, spec.q_per_kv, spec.intermediate_size

    def layer(key: str, l: int) -> torch.Tensor:
        item = items[key]
        size = tuple(item.size)
        return _load_region(iter_dir, key, item, (l,) + (0,) * (len(size) - 1), (1,) + size[1:])[0]

    def whole(key: str) -> torch.Tensor:
        item = items[key]
        return _load_region(iter_dir, key, item, (0,) * len(item.size), tuple(item.size))

    def vocab(key: str) -> torch.Tensor:
        t = whole(key)
        pad = t[spec.vocab_size:]
        if pad.numel() and bool((pad != 0).any()):
            row = spec.vocab_size + int((pad != 0).any(dim=1).nonzero()[0])
            raise CheckpointError(f"{iter_dir}: tensor {key}: vocabulary padding row {row} (of {t.shape[0]}, real "
                                  f"vocabulary {spec.vocab_size}) is not zero")
        return t[:spec.vocab_size].clone()

    qkv: dict[tuple[int, str], torch.Tensor] = {}
    for name in canonical_names(spec):
        if name == "model.embed_tokens.weight":
            yield name, vocab("embedding.word_embeddings.weight")
            continue
        if name == "lm_head.weight":
            yield name, vocab("output_layer.weight")
            continue
        if name == "model.norm.weight":
            yield name, whole("decoder.final_layernorm.weight")
            continue
        _, _, l, rest = name.split(".", 3)
        l = int(l)
        p = "decoder.layers."
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            kind = rest.rsplit(".", 1)[1]
            if (l, kind) not in qkv:
                qkv = {k: v for k, v in qkv.items() if k[0] == l}
                qkv[(l, kind)] = layer(p + f"self_attention.linear_qkv.{kind}", l)
            fused = qkv[(l, kind)]
            tail = fused.shape[1:]
            grouped = fused.reshape(spec.num_kv_heads, (qpk + 2) * d, *tail)
            part = {"q": grouped[:, :qpk * d], "k": grouped[:, qpk * d:(qpk + 1) * d],
                    "v": grouped[:, (qpk + 1) * d:]}[rest.split(".")[1][0]]
            yield name, part.reshape(-1, *tail).clone()
        elif rest == "input_layernorm.weight":
            yield name, layer(p + "self_attention.linear_qkv.layer_norm_weight", l)
        elif rest == "self_attn.o_proj.weight":
            yield name, layer(p + "self_attention.linear_proj.weight", l)
        elif rest == "self_attn.o_proj.bias":
            yield name, layer(p + "self_attention.linear_proj.bias", l)
        elif rest == "self_attn.sinks":
            yield name, layer(p + "self_attention.core_attention.softmax_offset", l)
        elif rest == "post_attention_layernorm.weight":
            yield name, layer(p + "pre_mlp_layernorm.weight", l)
        elif rest in ("mlp.router.weight", "mlp.router.bias"):
            yield name, layer(p + rest, l)
        elif rest == "mlp.experts.gate_up_proj":
            fc1 = layer(p + "mlp.experts.experts.linear_fc1.weight", l)  # [E, 2I, H] = [gate; up]
            out = torch.empty(spec.num_experts, h, 2 * inter, dtype=fc1.dtype)
            out[:, :, 0::2] = fc1[:, :inter].transpose(1, 2)
            out[:, :, 1::2] = fc1[:, inter:].transpose(1, 2)
            yield name, out
        elif rest == "mlp.experts.gate_up_proj_bias":
            b = layer(p + "mlp.experts.experts.linear_fc1.bias", l)
            out = torch.empty_like(b)
            out[:, 0::2], out[:, 1::2] = b[:, :inter], b[:, inter:]
            yield name, out
        elif rest == "mlp.experts.down_proj":
            yield name, layer(p + "mlp.experts.experts.linear_fc2.weight", l).transpose(1, 2).contiguous()
        elif rest == "mlp.experts.down_proj_bias":
            yield name, layer(p + "mlp.experts.experts.linear_fc2.bias", l)
        else:  # pragma: no cover
            raise AssertionError(name)
