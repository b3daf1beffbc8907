"""Megatron-LM's legacy per-rank layout (`--ckpt-format torch`), as SPEC.md §8 describes it.

    <root>/latest_checkpointed_iteration.txt                        ("0")
    <root>/iter_0000000/mp_rank_{t:02d}[_{s:03d} if PP>1][_{p:03d} if EP>1]/model_optim_rng.pt
    <root>/gptoss_verify_megatron.json                              (our sidecar: spec, tp/ep/pp, padding)

Each file holds `{'model': state_dict, 'checkpoint_version': 3.0, 'iteration': 0}`, tensors only
(`torch.load(..., weights_only=True)`), with the rank's local layer and expert numbers and its
tensor-parallel shard (TE layer spec, TEGroupedMLP names):

- `linear_qkv` rows grouped per KV group `[q heads of g; k_g; v_g]`, whole groups per TP rank;
- `linear_proj` (o_proj) split by columns, its bias replicated; sinks (`softmax_offset`) by head;
- norms, router and row-parallel biases replicated, bit-equal on every rank;
- experts whole (expert TP = 1), EP rank p holding experts [p·E/EP, (p+1)·E/EP) under local k:
  `linear_fc1.weight{k}` = [gate; up] rows [2I, H], `linear_fc2.weight{k}` = down_proj[e].T [H, I];
- embedding and output layer split by vocabulary rows, padded to `ceil(V/(128·TP))·128·TP` rows
  with zeros when `pad_vocab` (Megatron-LM's rule), unpadded otherwise (Megatron-Bridge's default).

Reading is strict: every file is checked against what the sidecar implies (a missing or extra
tensor, a shape or dtype names the file and tensor), `_extra_state` entries are ignored, the
SequentialMLP spelling `local_experts.{k}.linear_fc1.weight` is accepted, replicated copies must be
bit-equal, padding rows must be zero. Writing fills every rank file at once, a writer thread per
file (`fanout_writer`, `megatron_torchfile`): each distinct tensor is cut once from a random-access
source (`megatron_source`) and queued for every file that holds a copy of it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from ..config import ConfigError, ModelSpec
from ..weights import canonical_names
from .canonical import Stream, TensorTable
from .errors import CheckpointError
from .fanout_writer import FanOutWriter
from .megatron_source import Source, open_source
from .megatron_torchfile import StoredTensor, StreamingTorchFile, _contiguous, index
from .readahead import ReadAhead
from .safetensors_io import atomic_directory, write_json

NAME = "megatron"
SIDECAR = "gptoss_verify_megatron.json"
TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"
ITERATION = 0
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


# ---- the layout ---------------------------------------------------------------------------------
def padded_vocab_size(vocab: int, tp: int, pad_vocab: bool) -> int:
    """Megatron-LM's `calculate_padded_vocab_size` (divisible by 128·TP), or V unpadded."""
    if not pad_vocab:
        return vocab
    multiple = 128 * tp
    return -(-vocab // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    pp: int = 1
    pad_vocab: bool = False

    def check(self, spec: ModelSpec) -> None:
        """Refuse sizes that do not divide, naming the value."""
        for name, value in (("tp", self.tp), ("ep", self.ep), ("pp", self.pp)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"megatron: {name} must be a positive integer, got {value!r}")
        if spec.num_kv_heads % self.tp:
            raise CheckpointError(f"megatron: tp={self.tp} must divide the {spec.num_kv_heads} KV heads "
                                  "(linear_qkv is split by whole query groups)")
        if spec.num_experts % self.ep:
            raise CheckpointError(f"megatron: ep={self.ep} must divide the {spec.num_experts} experts")
        if spec.num_layers % self.pp:
            raise CheckpointError(f"megatron: pp={self.pp} must divide the {spec.num_layers} layers")
        if padded_vocab_size(spec.vocab_size, self.tp, self.pad_vocab) % self.tp:
            raise CheckpointError(f"megatron: tp={self.tp} must divide the vocabulary of {spec.vocab_size} rows "
                                  "(pass pad_vocab to pad it the way Megatron-LM does)")

    def vocab(self, spec: ModelSpec) -> int:
        return padded_vocab_size(spec.vocab_size, self.tp, self.pad_vocab)

    def ranks(self) -> list[tuple[int, int, int]]:
        """(t, s, p) for every rank file, in directory order."""
        return [(t, s, p) for t in range(self.tp) for s in range(self.pp) for p in range(self.ep)]

    def rank_dir(self, t: int, s: int, p: int) -> str:
        name = f"mp_rank_{t:02d}"
        if self.pp > 1:
            name += f"_{s:03d}"
        if self.ep > 1:
            name += f"_{p:03d}"
        return name

    def stage_layers(self, spec: ModelSpec, s: int) -> range:
        per = spec.num_layers // self.pp
        return range(s * per, (s + 1) * per)

    def experts_of(self, spec: ModelSpec, p: int) -> range:
        per = spec.num_experts // self.ep
        return range(p * per, (p + 1) * per)


def layer_prefix(i: int) -> str:
    return f"decoder.layers.{i}."


# A recipe builds one rank's tensor from a Source.
Recipe = Callable[[Source], torch.Tensor]


class Piece(NamedTuple):
    """One tensor of a rank file: its shape, how to cut it from the canonical tensors, and which
    rank index its bytes depend on within a stage: "t" (a tensor-parallel piece, the same on every
    expert-parallel rank), "p" (an expert, the same on every tensor-parallel rank) or "" (the same
    everywhere). Ranks that agree on that index hold bit-equal copies, so a writer builds it once."""
    shape: tuple[int, ...]
    recipe: Recipe
    varies_with: str

    def copy_key(self, t: int, p: int) -> tuple[int | None, int | None]:
        return (t if "t" in self.varies_with else None, p if "p" in self.varies_with else None)


def rank_plan(spec: ModelSpec, lay: Layout, t: int, s: int, p: int) -> dict[str, Piece]:
    """Every tensor of rank (t, s, p) in file order, with its shape, how to cut it from the
    canonical tensors and which ranks share its bytes. The one place the split rules live: `write`,
    `expected_tensors` and the sharded forward's checks all derive from it."""
    h, d, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
    nh, ng, qpk, T = spec.num_heads, spec.num_kv_heads, spec.q_per_kv, lay.tp
    groups = range(t * ng // T, (t + 1) * ng // T)
    vp = lay.vocab(spec)
    vrows = (t * vp // T, (t + 1) * vp // T)
    gate_then_up = torch.cat([torch.arange(0, 2 * inter, 2), torch.arange(1, 2 * inter, 2)])  # fc1 row order
    plan: dict[str, Piece] = {}

    def vocab_rows(name: str) -> Recipe:
        def make(src: Source) -> torch.Tensor:
            a, b = vrows
            real = src.rows(name, min(a, spec.vocab_size), min(b, spec.vocab_size))
            if real.shape[0] == b - a:
                return real
            pad = torch.zeros(b - a - real.shape[0], h, dtype=real.dtype)
            return torch.cat([real, pad])
        return make

    if s == 0:
        plan["embedding.word_embeddings.weight"] = Piece((vp // T, h), vocab_rows("model.embed_tokens.weight"), "t")
    for i, layer in enumerate(lay.stage_layers(spec, s)):
        hf, mg = f"model.layers.{layer}.", layer_prefix(i)

        def qkv(kind: str, hf=hf) -> Recipe:
            def make(src: Source) -> torch.Tensor:
                g0, g1 = groups.start, groups.stop
                q = src.rows(hf + f"self_attn.q_proj.{kind}", g0 * qpk * d, g1 * qpk * d)
                k = src.rows(hf + f"self_attn.k_proj.{kind}", g0 * d, g1 * d)
                v = src.rows(hf + f"self_attn.v_proj.{kind}", g0 * d, g1 * d)
                n = g1 - g0
                tail = q.shape[1:]
                return torch.cat([q.reshape(n, qpk * d, *tail), k.reshape(n, d, *tail),
                                  v.reshape(n, d, *tail)], dim=1).reshape(-1, *tail)
            return make

        def rows(name: str, a: int, b: int) -> Recipe:
            return lambda src: src.rows(name, a, b)

        def whole(name: str) -> Recipe:
            return lambda src: src.full(name)

        def proj(src: Source, name=hf + "self_attn.o_proj.weight") -> torch.Tensor:
            w = src.full(name)
            return w[:, t * nh * d // T:(t + 1) * nh * d // T].contiguous()

        rows_qkv = len(groups) * (qpk + 2) * d
        plan[mg + "self_attention.linear_qkv.layer_norm_weight"] = Piece((h,), whole(hf + "input_layernorm.weight"), "")
        plan[mg + "self_attention.linear_qkv.weight"] = Piece((rows_qkv, h), qkv("weight"), "t")
        plan[mg + "self_attention.linear_qkv.bias"] = Piece((rows_qkv,), qkv("bias"), "t")
        plan[mg + "self_attention.linear_proj.weight"] = Piece((h, nh * d // T), proj, "t")
        plan[mg + "self_attention.linear_proj.bias"] = Piece((h,), whole(hf + "self_attn.o_proj.bias"), "")
        plan[mg + "self_attention.core_attention.softmax_offset"] = Piece(
            (nh // T,), rows(hf + "self_attn.sinks", t * nh // T, (t + 1) * nh // T), "t")
        plan[mg + "pre_mlp_layernorm.weight"] = Piece((h,), whole(hf + "post_attention_layernorm.weight"), "")
        plan[mg + "mlp.router.weight"] = Piece((spec.num_experts, h), whole(hf + "mlp.router.weight"), "")
        plan[mg + "mlp.router.bias"] = Piece((spec.num_experts,), whole(hf + "mlp.router.bias"), "")
        for k, e in enumerate(lay.experts_of(spec, p)):
            def fc1_w(src: Source, e=e, hf=hf) -> torch.Tensor:  # HF's interleaved gate/up rows -> [gate; up]
                return src.expert_t(hf + "mlp.experts.gate_up_proj", e, order=gate_then_up)

            def fc1_b(src: Source, e=e, hf=hf) -> torch.Tensor:
                b = src.rows(hf + "mlp.experts.gate_up_proj_bias", e, e + 1)[0]
                return torch.cat([b[0::2], b[1::2]])

            def fc2_w(src: Source, e=e, hf=hf) -> torch.Tensor:
                return src.expert_t(hf + "mlp.experts.down_proj", e)  # down_proj[e] [I,H] -> [H,I]

            ex = mg + "mlp.experts."
            plan[ex + f"linear_fc1.weight{k}"] = Piece((2 * inter, h), fc1_w, "p")
            plan[ex + f"linear_fc1.bias{k}"] = Piece((2 * inter,), fc1_b, "p")
            plan[ex + f"linear_fc2.weight{k}"] = Piece((h, inter), fc2_w, "p")
            plan[ex + f"linear_fc2.bias{k}"] = Piece(
                (h,), lambda src, e=e, hf=hf: src.rows(hf + "mlp.experts.down_proj_bias", e, e + 1)[0], "p")
    if s == lay.pp - 1:
        plan["decoder.final_layernorm.weight"] = Piece((h,), lambda src: src.full("model.norm.weight"), "")
        plan["output_layer.weight"] = Piece((vp // T, h), vocab_rows("lm_head.weight"), "t")
    return plan


def expected_tensors(spec: ModelSpec, tp: int = 1, ep: int = 1, pp: int = 1, pad_vocab: bool = False,
                     dtype: torch.dtype = torch.bfloat16, **_ignored) -> TensorTable:
    """`"<rank dir>/<tensor name>"` -> (shape, dtype) for every rank file."""
    lay = Layout(tp, ep, pp, pad_vocab)
    lay.check(spec)
    table: TensorTable = {}
    for t, s, p in lay.ranks():
        rd = lay.rank_dir(t, s, p)
        for name, piece in rank_plan(spec, lay, t, s, p).items():
            table[f"{rd}/{name}"] = (piece.shape, dtype)
    return table


# ---- writing ------------------------------------------------------------------------------------
def sidecar(spec: ModelSpec, lay: Layout, dtype: torch.dtype) -> dict:
    return {"format": "megatron-legacy", "written_by": "gptoss-verify", "spec": spec.to_json(),
            "tp": lay.tp, "ep": lay.ep, "pp": lay.pp, "etp": 1, "pad_vocab": lay.pad_vocab,
            "vocab_size": spec.vocab_size, "padded_vocab_size": lay.vocab(spec),
            "dtype": str(dtype).removeprefix("torch."), "iteration": ITERATION,
            "checkpoint_version": CHECKPOINT_VERSION, "expert_layout": "TEGroupedMLP"}


def write(stream: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor] | Source, spec: ModelSpec,
          out_dir: str | Path, *, tp: int = 1, ep: int = 1, pp: int = 1, pad_vocab: bool = False,
          progress: bool = False, **_ignored) -> None:
    """Write the legacy per-rank layout atomically (temp dir beside `out_dir`, renamed at the end).

    The source is either the canonical stream (dense or MXFP4 experts; a one-shot iterator is
    spooled to a scratch file beside `out_dir` as it arrives, so memory stays at one slice), or a
    `Mapping` name -> tensor that is sliced directly (an in-memory dict, or a lazy mapping that
    loads one tensor per `__getitem__`; MXFP4 pairs in it are decoded expert by expert). Float
    tensors keep the source's float dtype; MXFP4 experts are decoded exactly to it (bf16 normally).
    """
    lay = Layout(tp, ep, pp, pad_vocab)
    lay.check(spec)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        bar = tqdm(desc=f"read {out_dir.name}", unit="tensor", disable=None if progress else True, leave=False)
        src = open_source(stream, out_dir.parent, bar)
        bar.close()
        try:
            _check_source(src, spec)
            dtype = src.dtype
            iter_dir = tmp / f"iter_{ITERATION:07d}"
            _write_rank_files(src, spec, lay, iter_dir, dtype, progress and f"write megatron {out_dir.name}")
        finally:
            src.close()
        (tmp / TRACKER).write_text(f"{ITERATION}\n")
        write_json(tmp / SIDECAR, sidecar(spec, lay, dtype))


def _write_rank_files(src: Source, spec: ModelSpec, lay: Layout, iter_dir: Path, dtype: torch.dtype,
                      progress: str | bool) -> None:
    """Every rank file at once (`FanOutWriter`: a writer thread per file), each distinct tensor
    built once and queued for all the files that hold a copy of it (`Piece.copy_key`). `progress`:
    the progress bar's label, or False for none."""
    plans = {r: rank_plan(spec, lay, *r) for r in lay.ranks()}
    largest = max(dtype.itemsize * math.prod(piece.shape) for plan in plans.values() for piece in plan.values())
    files = FanOutWriter(budget=max(largest, 64 << 20))
    bar = tqdm(total=sum(len(plan) for plan in plans.values()), desc=progress or None, unit="tensor",
               disable=None if progress else True, leave=False)
    try:
        for r, plan in plans.items():
            rd = iter_dir / lay.rank_dir(*r)
            rd.mkdir(parents=True)
            files.add(r, StreamingTorchFile(rd / FILE, [(n, piece.shape, dtype) for n, piece in plan.items()],
                                            lambda refs: {"model": refs, "checkpoint_version": CHECKPOINT_VERSION,
                                                          "iteration": ITERATION}))
        ahead = _Prefetch(src, spec)
        for s in range(lay.pp):
            stage = [r for r in plans if r[1] == s]
            names = list(plans[stage[0]])
            assert all(list(plans[r]) == names for r in stage), "ranks of a stage list the same tensors"
            layers = lay.stage_layers(spec, s)
            ahead.reach(layers.start)
            for name in names:
                if name.startswith("decoder.layers."):  # in layer L: read L + 1 ahead (asked once)
                    ahead.reach(layers[int(name.split(".")[2])] + 1)
                copies: dict[tuple, list] = {}
                for t, _, p in stage:
                    copies.setdefault(plans[(t, s, p)][name].copy_key(t, p), []).append((t, s, p))
                for ranks in copies.values():
                    files.put(ranks, name, plans[ranks[0]][name].recipe(src).to(dtype))
                    bar.update(len(ranks))
    except BaseException:
        files.abort()
        raise
    finally:
        bar.close()
    files.close()


class _Prefetch:
    """Asks the source to read layer L's canonical tensors (the final norm and output layer after
    the last) once the writer reaches layer L - 1, so that reading overlaps building and writing."""

    def __init__(self, src: Source, spec: ModelSpec):
        self.src, self.asked = src, set()
        self.by_layer: dict[int, list[str]] = {}
        for name in canonical_names(spec):
            layer = int(name.split(".")[2]) if name.startswith("model.layers.") else (
                spec.num_layers if name != "model.embed_tokens.weight" else -1)
            self.by_layer.setdefault(layer, []).append(name)

    def reach(self, layer: int) -> None:
        if layer not in self.asked and layer in self.by_layer:
            self.asked.add(layer)
            self.src.prefetch(self.by_layer[layer])


def _check_source(src: Source, spec: ModelSpec) -> None:
    """Every canonical tensor is present with its canonical shape, and nothing else."""
    from ..weights import canonical_shapes
    shapes = canonical_shapes(spec)
    for name, shape in shapes.items():
        got = src.shape(name)
        if tuple(got) != tuple(shape):
            raise CheckpointError(f"source: tensor {name}: expected shape {list(shape)}, got {list(got)}")
    names = getattr(src, "names", None)
    if names is not None:
        for name in names():
            base = name.removesuffix("_blocks").removesuffix("_scales")
            if base not in shapes:
                raise CheckpointError(f"source: unexpected tensor {name}")


# ---- reading ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Checkpoint:
    """A legacy Megatron checkpoint on disk: where its rank files are and what they hold."""
    root: Path
    iter_dir: Path
    spec: ModelSpec
    layout: Layout
    files: dict[tuple[int, int, int], Path]  # (t, s, p) -> file; may be sparse
    meta: dict
    _models: dict = dataclasses.field(default_factory=dict, repr=False)

    def model(self, key: tuple[int, int, int]) -> dict[str, StoredTensor]:
        """The rank file's model entries, located but not read (cached: the pickle is parsed once)."""
        if key not in self._models:
            self._models[key] = _model_dict(self.files[key])
        return self._models[key]


def _iter_dir(root: Path) -> Path | None:
    if any(_RANK_DIR.match(c.name) for c in root.iterdir() if c.is_dir()):
        return root
    tracker = root / TRACKER
    if tracker.is_file():
        value = tracker.read_text().strip()
        cand = root / ("release" if value == "release" else f"iter_{int(value):07d}" if value.isdigit() else value)
        if cand.is_dir():
            return cand
        raise CheckpointError(f"{tracker}: names iteration {value!r}, but {cand} does not exist")
    iters = sorted(c for c in root.iterdir() if c.is_dir() and (c.name.startswith("iter_") or c.name == "release"))
    for cand in reversed(iters):
        if any(_RANK_DIR.match(c.name) for c in cand.iterdir() if c.is_dir()):
            return cand
    return None


def detect(path: str | Path) -> bool:
    path = Path(path)
    try:
        it = _iter_dir(path) if path.is_dir() else None
    except (CheckpointError, OSError, ValueError):
        return True  # it looks like one (a tracker), and reading it will say what is wrong
    return it is not None and any((c / FILE).is_file() for c in it.iterdir() if _RANK_DIR.match(c.name))


def _find_meta(root: Path, iter_dir: Path) -> dict | None:
    for cand in (root / SIDECAR, iter_dir / SIDECAR, iter_dir.parent / SIDECAR):
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except ValueError as err:
                raise CheckpointError(f"{cand}: not valid JSON ({err})") from None
    return None


def read_spec(path: str | Path) -> ModelSpec:
    return open_checkpoint(path).spec


def _spec_from(root: Path, iter_dir: Path, meta: dict | None) -> ModelSpec:
    if meta is not None and "spec" in meta:
        try:
            return ModelSpec.from_json(meta["spec"])
        except (ConfigError, TypeError) as err:
            raise CheckpointError(f"{root / SIDECAR}: spec: {err}") from None
    for cand in (root / "config.json", iter_dir / "config.json"):
        if cand.is_file():
            try:
                return ModelSpec.from_hf_config(cand, name=root.name)
            except ConfigError as err:
                raise CheckpointError(f"{cand}: {err}") from None
    raise CheckpointError(f"{root}: no {SIDECAR} and no HF config.json beside the Megatron checkpoint: "
                          "the model's hyperparameters cannot be read from the rank files alone")


def open_checkpoint(path: str | Path) -> Checkpoint:
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    iter_dir = _iter_dir(root)
    if iter_dir is None:
        raise CheckpointError(f"{root}: no Megatron rank directories (mp_rank_*) found")
    meta = _find_meta(root, iter_dir)
    spec = _spec_from(root, iter_dir, meta)
    found: dict[tuple[int, ...], Path] = {}
    for c in sorted(iter_dir.iterdir()):
        m = _RANK_DIR.match(c.name)
        if m and c.is_dir():
            if not (c / FILE).is_file():
                raise CheckpointError(f"{c}: rank directory without {FILE}")
            found[tuple(int(x) for x in m.groups() if x is not None)] = c / FILE
    if not found:
        raise CheckpointError(f"{iter_dir}: no Megatron rank directories (mp_rank_*) found")
    if meta is not None and "tp" in meta:
        lay = Layout(int(meta["tp"]), int(meta.get("ep", 1)), int(meta.get("pp", 1)), bool(meta.get("pad_vocab", False)))
        if "padded_vocab_size" in meta and int(meta["padded_vocab_size"]) not in (spec.vocab_size, lay.vocab(spec)):
            raise CheckpointError(f"{root / SIDECAR}: padded_vocab_size {meta['padded_vocab_size']} is neither "
                                  f"{spec.vocab_size} nor Megatron-LM's {lay.vocab(spec)} for tp={lay.tp}")
    else:
        lay = _infer_layout(spec, found)
    lay.check(spec)
    files: dict[tuple[int, int, int], Path] = {}
    for key, file in found.items():
        if len(key) == 1:
            t, s, p = key[0], 0, 0
        elif len(key) == 3:
            t, s, p = key
        elif lay.pp > 1:
            t, s, p = key[0], key[1], 0
        else:
            t, s, p = key[0], 0, key[1]
        if t >= lay.tp or s >= lay.pp or p >= lay.ep or len(key) != 1 + (lay.pp > 1) + (lay.ep > 1):
            raise CheckpointError(f"{file.parent}: rank directory does not fit tp={lay.tp} pp={lay.pp} ep={lay.ep}")
        files[(t, s, p)] = file
    # a sparse set is fine (EP folded over TP x DP) as long as every piece exists somewhere
    for t in range(lay.tp):
        for s in range(lay.pp):
            if not any((t, s, p) in files for p in range(lay.ep)):
                raise CheckpointError(f"{iter_dir}: no file holds tensor-parallel rank {t} of stage {s} "
                                      f"(expected {lay.rank_dir(t, s, 0)}/{FILE})")
        for s in range(lay.pp):
            for p in range(lay.ep):
                if not any((t, s, p) in files for t in range(lay.tp)):
                    raise CheckpointError(f"{iter_dir}: no file holds expert-parallel rank {p} of stage {s} "
                                          f"(expected {lay.rank_dir(0, s, p)}/{FILE})")
    return Checkpoint(root, iter_dir, spec, lay, files, meta or {})


def _infer_layout(spec: ModelSpec, found: dict[tuple[int, ...], Path]) -> Layout:
    """Without our sidecar: tp from the names; one extra number is PP if stage 1 lacks the embedding."""
    tp = 1 + max(k[0] for k in found)
    lens = {len(k) for k in found}
    if len(lens) != 1:
        raise CheckpointError(f"{next(iter(found.values())).parent.parent}: rank directories mix naming schemes")
    n = lens.pop()
    if n == 1:
        pp = ep = 1
    elif n == 3:
        pp, ep = 1 + max(k[1] for k in found), 1 + max(k[2] for k in found)
    else:
        other = 1 + max(k[1] for k in found)
        probe = next(f for k, f in found.items() if k[1] == other - 1)
        has_embed = "embedding.word_embeddings.weight" in _model_dict(probe)
        pp, ep = (1, other) if has_embed or other == 1 else (other, 1)
    embed_file = next(f for k, f in found.items() if k[0] == 0 and all(x == 0 for x in k[1:2]))
    rows = _model_dict(embed_file).get("embedding.word_embeddings.weight")
    pad = rows is not None and rows.shape[0] * tp != spec.vocab_size
    return Layout(tp, ep, pp, pad)


_SEQ = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$")


def normalise(name: str) -> str | None:
    """A stored name in our canonical Megatron spelling, or None for entries to ignore."""
    if name.endswith("_extra_state"):
        return None
    m = _SEQ.match(name)
    if m:
        return f"{m.group(1)}.{m.group(3)}.{m.group(4)}{m.group(2)}"
    m = re.match(r"^(decoder\.layers\.\d+\.)input_layernorm\.weight$", name)  # local (non-TE) spec
    if m:
        return m.group(1) + "self_attention.linear_qkv.layer_norm_weight"
    return name


def _model_dict(file: Path) -> dict[str, StoredTensor]:
    obj = index(file)
    if not isinstance(obj, dict) or "model" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        hint = " (virtual pipeline stages 'model0', 'model1', ... are not supported)" if isinstance(obj, dict) and "model0" in obj else ""
        raise CheckpointError(f"{file}: expected a dict with a 'model' entry, got {keys}{hint}")
    out: dict[str, torch.Tensor] = {}
    for name, value in obj["model"].items():
        canon = normalise(name)
        if canon is None:
            continue
        if not isinstance(value, StoredTensor):
            raise CheckpointError(f"{file}: entry {name} is a {type(value).__name__}, not a tensor")
        if canon in out:
            raise CheckpointError(f"{file}: tensor {canon} appears twice (as {name})")
        out[canon] = value
    return out


def _check_file(ck: Checkpoint, key: tuple[int, int, int], sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    file = ck.files[key]
    plan = rank_plan(ck.spec, ck.layout, *key)
    for name, piece in plan.items():
        shape = piece.shape
        if name not in sd:
            raise CheckpointError(f"{file}: missing tensor {name} (expected {dtype} {list(shape)})")
        got = sd[name]
        if tuple(got.shape) != tuple(shape) or got.dtype != dtype:
            raise CheckpointError(f"{file}: tensor {name}: expected {dtype} {list(shape)}, "
                                  f"got {got.dtype} {list(got.shape)}")
    for name in sd:
        if name not in plan:
            raise CheckpointError(f"{file}: unexpected tensor {name}")


def _dtype_of(ck: Checkpoint) -> torch.dtype:
    sd = ck.model(next(iter(ck.files)))
    for t in sd.values():
        if t.dtype.is_floating_point:
            return t.dtype
    return torch.bfloat16


def load_rank(path: str | Path, tp_rank: int, ep_rank: int, pp_rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, state dict) of one rank, reading that rank's file only (memory-mapped). `meta` holds
    the sidecar's fields plus `spec` (a ModelSpec), `layout` (a Layout) and `file`. Names are in
    the TEGroupedMLP spelling, `_extra_state` dropped; the file is checked strictly."""
    ck = open_checkpoint(path)
    key = (tp_rank, pp_rank, ep_rank)
    lay = ck.layout
    if key not in ck.files:
        raise CheckpointError(f"{ck.iter_dir}: no file for tp rank {tp_rank}, pp rank {pp_rank}, ep rank {ep_rank} "
                              f"(expected {lay.rank_dir(tp_rank, pp_rank, ep_rank)}/{FILE})")
    stored = ck.model(key)
    dtype = next((t.dtype for t in stored.values() if t.dtype.is_floating_point), torch.bfloat16)
    _check_file(ck, key, stored, dtype)
    meta = dict(ck.meta)
    meta.update(spec=ck.spec, layout=lay, file=str(ck.files[key]), padded_vocab_size=lay.vocab(ck.spec))
    return meta, {name: t.load() for name, t in stored.items()}


def options(path: str | Path, tensors=None) -> dict:
    ck = open_checkpoint(path)
    lay = ck.layout
    return {"tp": lay.tp, "ep": lay.ep, "pp": lay.pp, "pad_vocab": lay.pad_vocab, "dtype": _dtype_of(ck)}


@dataclasses.dataclass(frozen=True)
class _Info:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


def list_tensors(path: str | Path) -> dict[str, _Info]:
    """`"<rank dir>/<name>"` -> shape, dtype, file, from the files' pickles (no tensor data read)."""
    ck = open_checkpoint(path)
    out: dict[str, _Info] = {}
    for key, file in ck.files.items():
        rd = ck.layout.rank_dir(*key)
        for name, t in ck.model(key).items():
            out[f"{rd}/{name}"] = _Info(tuple(t.shape), t.dtype, file)
    return out


def iter_stored(path: str | Path) -> Stream:
    ck = open_checkpoint(path)
    for key, file in ck.files.items():
        rd = ck.layout.rank_dir(*key)
        for name, t in ck.model(key).items():
            yield f"{rd}/{name}", t.load()


def read(path: str | Path) -> tuple[ModelSpec, Stream]:
    """(spec, canonical dense stream in canonical order). Every file is checked first; values are
    then gathered one canonical tensor at a time, each rank file memory-mapped only while read."""
    ck = open_checkpoint(path)
    dtype = _dtype_of(ck)
    for key in ck.files:
        _check_file(ck, key, ck.model(key), dtype)
    return ck.spec, _stream(ck, dtype)


class _Gather:
    """Pieces of one Megatron tensor from every file that holds them, copies checked bit-equal.
    The other copies' bytes are read ahead while the first is loaded, and `warm` reads whole
    layers ahead, so the disk keeps reading while the caller computes."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck
        self.ahead = ReadAhead()

    def copies(self, name: str, keys: Iterable[tuple[int, int, int]], out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor (read into `out` if given), after checking every other copy against it."""
        held = [(key, self.ck.model(key)[name]) for key in keys if key in self.ck.files]
        self.ahead.warm((stored.path, stored.offset, stored.nbytes) for _, stored in held[1:])
        (first_key, first), rest = held[0], held[1:]
        loaded = first.load(out)
        for key, stored in rest:
            if not _bit_equal_stored(loaded, stored):
                raise CheckpointError(
                    f"{self.ck.files[key]}: tensor {name} differs from its copy in {self.ck.files[first_key]} "
                    "(replicated tensors must be bit-equal on every rank)")
        return loaded

    def warm(self, s: int, prefixes: tuple[str, ...]) -> None:
        """Read the tensors of stage s whose names start with `prefixes` (every file) into the page cache."""
        self.ahead.warm((t.path, t.offset, t.nbytes) for key in self.ck.files if key[1] == s
                        for name, t in self.ck.model(key).items() if name.startswith(prefixes))


def _bit_equal_stored(a: torch.Tensor, stored: StoredTensor, chunk: int = 1 << 26) -> bool:
    """`a` equals a tensor still on disk, byte for byte, read in 64 MB pieces: a replicated copy
    (the vocabulary shard of every expert-parallel rank) is never held whole beside the first."""
    if tuple(a.shape) != tuple(stored.shape) or a.dtype != stored.dtype:
        return False
    if not _contiguous(stored.shape, stored.stride) or stored.nbytes != a.numel() * a.element_size():
        return _bit_equal(a, stored.load())
    mine = a.contiguous().reshape(-1).view(torch.uint8)
    buf = torch.empty(min(chunk, stored.nbytes), dtype=torch.uint8)
    with open(stored.path, "rb") as f:
        f.seek(stored.offset)
        for start in range(0, stored.nbytes, chunk):
            n = min(chunk, stored.nbytes - start)
            if f.readinto(memoryview(buf.numpy())[:n]) != n:
                raise CheckpointError(f"{stored.path}: truncated (a tensor's data ends past the end of the file)")
            if not _same_bytes(buf[:n], mine[start:start + n]):
                return False
    return True


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and _same_bytes(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two flat uint8 tensors hold the same bytes; compared 8 bytes at a time where both allow it
    (torch.equal on uint8 runs about 1.7 GB/s on the benchmark machine, on int64 about 12)."""
    if a.numel() != b.numel():
        return False
    if a.numel() % 8 == 0 and a.data_ptr() % 8 == 0 and b.data_ptr() % 8 == 0:
        return torch.equal(a.view(torch.int64), b.view(torch.int64))
    return torch.equal(a, b)


def _stream(ck: Checkpoint, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    spec, lay, g = ck.spec, ck.layout, _Gather(ck)
    T, P, S = lay.tp, lay.ep, lay.pp
    d, qpk = spec.head_dim, spec.q_per_kv
    per_stage = spec.num_layers // S

    def tp_shards(name: str, s: int) -> list[torch.Tensor]:
        return [g.copies(name, [(t, s, p) for p in range(P)]) for t in range(T)]

    def everywhere(name: str, s: int) -> torch.Tensor:
        return g.copies(name, [(t, s, p) for t in range(T) for p in range(P)])

    def vocab(name: str, s: int) -> torch.Tensor:
        """The real rows, filled shard by shard (no concatenated copy); padding rows must be zero."""
        keys = [[(t, s, p) for p in range(P)] for t in range(T)]
        stored = next(ck.model(k)[name] for k in keys[0] if k in ck.files)
        rows, width = stored.shape
        out = torch.empty(spec.vocab_size, width, dtype=stored.dtype)
        for t in range(T):
            a, b = t * rows, (t + 1) * rows
            real = max(0, min(b, spec.vocab_size) - a)
            if real == rows:  # no padding rows: read straight into place
                g.copies(name, keys[t], out=out[a:b])
                continue
            shard = g.copies(name, keys[t])
            out[a:a + real] = shard[:real]
            pad = shard[real:]
            if pad.numel() and bool((pad != 0).any()):
                row = a + real + int((pad != 0).any(dim=1).nonzero()[0])
                file = ck.files[next(k for k in sorted(ck.files) if k[0] == t and k[1] == s)]
                raise CheckpointError(f"{file}: tensor {name}: vocabulary padding row {row} (of {rows * T}, real "
                                      f"vocabulary {spec.vocab_size}) is not zero")
            del shard, pad  # not held while the next shard is read
        return out

    def warm(layer: int) -> None:
        """Read global layer `layer` (the final norm and output layer after the last) ahead."""
        if layer < spec.num_layers:
            s, i = divmod(layer, per_stage)
            g.warm(s, (layer_prefix(i),))
        else:
            g.warm(S - 1, ("decoder.final_layernorm.", "output_layer."))

    qkv_cache: dict[str, torch.Tensor] = {}
    warmed = 0
    warm(0)
    try:
        for name in canonical_names(spec):
            if name == "model.embed_tokens.weight":
                yield name, vocab("embedding.word_embeddings.weight", 0)
                continue
            if name == "lm_head.weight":
                yield name, vocab("output_layer.weight", S - 1)
                continue
            if name == "model.norm.weight":
                yield name, everywhere("decoder.final_layernorm.weight", S - 1)
                continue
            _, _, layer, rest = name.split(".", 3)
            layer = int(layer)
            if layer + 1 > warmed:  # the first tensor of a layer: read the next one meanwhile
                warmed = layer + 1
                warm(warmed)
            s, i = divmod(layer, per_stage)
            mg = layer_prefix(i)
            if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                        "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"):
                kind = rest.rsplit(".", 1)[1]
                key = f"{layer}.{kind}"
                if key not in qkv_cache:
                    if not any(k.startswith(f"{layer}.") for k in qkv_cache):
                        qkv_cache.clear()
                    qkv_cache[key] = torch.cat(tp_shards(mg + f"self_attention.linear_qkv.{kind}", s))
                fused = qkv_cache[key]
                tail = fused.shape[1:]
                grouped = fused.reshape(spec.num_kv_heads, (qpk + 2) * d, *tail)
                part = {"q": grouped[:, :qpk * d], "k": grouped[:, qpk * d:(qpk + 1) * d],
                        "v": grouped[:, (qpk + 1) * d:]}[rest.split(".")[1][0]]
                yield name, part.reshape(-1, *tail).clone()
                continue
            simple = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                      "self_attn.o_proj.bias": "self_attention.linear_proj.bias",
                      "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
                      "mlp.router.weight": "mlp.router.weight", "mlp.router.bias": "mlp.router.bias"}
            if rest in simple:
                yield name, everywhere(mg + simple[rest], s)
            elif rest == "self_attn.o_proj.weight":
                yield name, torch.cat(tp_shards(mg + "self_attention.linear_proj.weight", s), dim=1)
            elif rest == "self_attn.sinks":
                yield name, torch.cat(tp_shards(mg + "self_attention.core_attention.softmax_offset", s))
            elif rest.startswith("mlp.experts."):
                yield name, _experts(rest.removeprefix("mlp.experts."), mg + "mlp.experts.", s, spec, lay, g, dtype)
            else:  # pragma: no cover - canonical_names and this table are written together
                raise AssertionError(name)
    finally:
        g.ahead.close()


def _experts(what: str, prefix: str, s: int, spec: ModelSpec, lay: Layout, g: _Gather, dtype) -> torch.Tensor:
    """One canonical expert tensor. Weights are assembled in Megatron's [E, out, in] orientation
    and handed on as a transposed view with the canonical [E, in, out] shape: the MXFP4 encoder
    and the OpenAI writer want [out, in] anyway, so nothing transposes them there and back; a dense
    HF writer copies the view band by band."""
    e_all, h, inter = spec.num_experts, spec.hidden_size, spec.intermediate_size
    shapes = {"gate_up_proj": (e_all, 2 * inter, h), "gate_up_proj_bias": (e_all, 2 * inter),
              "down_proj": (e_all, h, inter), "down_proj_bias": (e_all, h)}
    out = torch.empty(shapes[what], dtype=dtype)
    stored = {"gate_up_proj": "linear_fc1.weight", "gate_up_proj_bias": "linear_fc1.bias",
              "down_proj": "linear_fc2.weight", "down_proj_bias": "linear_fc2.bias"}[what]
    for p in range(lay.ep):
        for k, e in enumerate(lay.experts_of(spec, p)):
            t = g.copies(prefix + f"{stored}{k}", [(tt, s, p) for tt in range(lay.tp)])
            if what in ("gate_up_proj", "gate_up_proj_bias"):  # [gate; up] halves -> interleaved rows
                out[e, 0::2] = t[:inter]
                out[e, 1::2] = t[inter:]
            else:
                out[e] = t
    return out.transpose(1, 2) if out.dim() == 3 else out
