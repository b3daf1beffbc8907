"""Megatron-LM's legacy per-rank layout (`--ckpt-format torch`), docs/megatron.md.

    <root>/latest_checkpointed_iteration.txt                        ("0")
    <root>/iter_0000000/mp_rank_{t:02d}[_{s:03d} if PP>1][_{p:03d} if EP>1]/model_optim_rng.pt
    <root>/gptoss_verify_megatron.json                              (our sidecar: spec, tp/ep/pp, padding)

Each file holds `{'model': state_dict, 'checkpoint_version': 3.0, 'iteration': 0}`, tensors only
(`torch.load(..., weights_only=True)`), with the rank's local layer and expert numbers and its
share of every row of the mapping table (`mapping.py`: names, transforms, shard rules).

Reading is strict: every file is checked against what the sidecar implies (a missing or extra
tensor, a shape or dtype names the file and tensor), `_extra_state` entries are ignored, the
local-spec spellings are accepted, replicated copies must be bit-equal, padding rows must be zero.
Writing fills every rank file at once, a writer thread per file (`fileio.fanout_writer`,
`fileio.torch_save_file`): each distinct tensor is cut once from a random-access source
(`source.py`) and queued for every file that holds a copy of it.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from ...config import ModelSpec
from ...schema import canonical_names, canonical_shapes
from ..canonical import Stream, TensorTable
from ..errors import CheckpointError
from ..fileio.fanout_writer import FanOutWriter
from ..fileio.readahead import ReadAhead
from ..fileio.torch_save_file import StoredTensor, StreamingTorchFile, index
from ..fileio.partials import atomic_directory
from ..safetensors_io import write_json, write_text
from . import mapping
from .files import ITERATION, SIDECAR, TRACKER, Layout, Listed, find_iter_dir, read_sidecar, read_spec_beside, sidecar
from .mapping import EXPERT, FIRST, LAST, LAYER, ROW, ROWS, Row, Shard
from .source import Source, open_source

NAME = "megatron"
FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


# A recipe builds one rank's tensor from a Source.
Recipe = Callable[[Source], torch.Tensor]


class Piece(NamedTuple):
    """One tensor of a rank file: its shape, how to cut it from the canonical tensors, which rank
    index its bytes depend on within a stage (the row's shard rule: "t", "p" or "", see
    `mapping.Shard.varies_with`; ranks that agree on it hold bit-equal copies, so a writer builds
    it once) and its global layer (None outside the layers)."""
    shape: tuple[int, ...]
    recipe: Recipe
    varies_with: str
    layer: int | None = None

    def copy_key(self, t: int, p: int) -> tuple[int | None, int | None]:
        return (t if "t" in self.varies_with else None, p if "p" in self.varies_with else None)


def rank_plan(spec: ModelSpec, lay: Layout, t: int, s: int, p: int, names: str = mapping.TE) -> dict[str, Piece]:
    """Every tensor of rank (t, s, p) in file order, with its shape, how to cut it from the
    canonical tensors and which ranks share its bytes, from the mapping table's rows. `write`,
    `expected_tensors` and the reader's checks all derive from it."""
    vp, T = lay.vocab(spec), lay.tp
    # per row once: a plan of a 120B model at tp8 x ep8 x pp4 has 168k pieces
    shapes = {row.key: row.piece_shape(spec, vp, T) for row in ROWS}
    varies = {row.key: row.shard.varies_with for row in ROWS}
    spelled = {row.key: row.names[names].legacy for row in ROWS}
    plan: dict[str, Piece] = {}

    def add(row: Row, i: int | None = None, layer: int | None = None, k: int | None = None, e: int | None = None):
        plan[spelled[row.key].format(i=i, k=k)] = Piece(
            shapes[row.key], partial(row.cut, spec=spec, vocab_rows=vp, layer=layer, t=t, tp=T, expert=e),
            varies[row.key], layer)

    if s == 0:
        for row in ROWS:
            if row.scope == FIRST:
                add(row)
    for i, layer in enumerate(lay.stage_layers(spec, s)):
        for row in ROWS:
            if row.scope == LAYER:
                add(row, i, layer)
        for k, e in enumerate(lay.experts_of(spec, p)):
            for row in ROWS:
                if row.scope == EXPERT:
                    add(row, i, layer, k, e)
    if s == lay.pp - 1:
        for row in ROWS:
            if row.scope == LAST:
                add(row)
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
def write(stream: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor] | Source, spec: ModelSpec,
          out_dir: str | Path, *, tp: int = 1, ep: int = 1, pp: int = 1, pad_vocab: bool = False,
          names: str = mapping.TE, progress: bool = False, **_ignored) -> None:
    """Write the legacy per-rank layout atomically (an owned partial beside `out_dir`, renamed at the end).

    `names`: the name set of the tensors (`mapping.NAME_SETS`): `te`, TransformerEngine's layer
    spec with TEGroupedMLP (what Megatron-Bridge writes; the default), or `local`, megatron-core's
    local spec with SequentialMLP (what its `load_state_dict(strict=True)` takes as is).

    The source is either the canonical stream (dense or MXFP4 experts; a one-shot iterator is
    spooled to a scratch file inside the partial output as it arrives, so memory stays at one slice), or a
    `Mapping` name -> tensor that is sliced directly (an in-memory dict, or a lazy mapping that
    loads one tensor per `__getitem__`; MXFP4 pairs in it are decoded expert by expert). Float
    tensors keep the source's float dtype; MXFP4 experts are decoded exactly to it (bf16 normally).
    """
    if names not in mapping.NAME_SETS:
        raise ValueError(f"megatron: names expected one of {mapping.NAME_SETS}, got {names!r}")
    lay = Layout(tp, ep, pp, pad_vocab)
    lay.check(spec)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        bar = tqdm(desc=f"read {out_dir.name}", unit="tensor", disable=None if progress else True, leave=False)
        src = open_source(stream, tmp, bar)  # a spool lives inside the owned partial
        bar.close()
        try:
            _check_source(src, spec)
            dtype = src.dtype
            iter_dir = tmp / f"iter_{ITERATION:07d}"
            _write_rank_files(src, spec, lay, iter_dir, dtype, progress and f"write megatron {out_dir.name}", names)
        finally:
            src.close()
        write_text(tmp / TRACKER, f"{ITERATION}\n")
        write_json(tmp / SIDECAR, sidecar("megatron-legacy", spec, lay, dtype)
                   | {"checkpoint_version": CHECKPOINT_VERSION, "names": names,
                      "expert_layout": "TEGroupedMLP" if names == mapping.TE else "SequentialMLP"})


def _write_rank_files(src: Source, spec: ModelSpec, lay: Layout, iter_dir: Path, dtype: torch.dtype,
                      progress: str | bool, names: str = mapping.TE) -> None:
    """Every rank file at once (`FanOutWriter`: a writer thread per file), each distinct tensor
    built once and queued for all the files that hold a copy of it (`Piece.copy_key`). `progress`:
    the progress bar's label, or False for none."""
    plans = {r: rank_plan(spec, lay, *r, names=names) for r in lay.ranks()}
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
            order = list(plans[stage[0]])
            assert all(list(plans[r]) == order for r in stage), "ranks of a stage list the same tensors"
            layers = lay.stage_layers(spec, s)
            ahead.reach(layers.start)
            for name in order:
                layer = plans[stage[0]][name].layer
                if layer is not None:  # in layer L: read L + 1 ahead (asked once)
                    ahead.reach(layer + 1)
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
            row, _, layer = mapping.row_of(name)
            if layer is None:  # before the first layer, or after the last
                layer = -1 if row.scope == FIRST else spec.num_layers
            self.by_layer.setdefault(layer, []).append(name)

    def reach(self, layer: int) -> None:
        if layer not in self.asked and layer in self.by_layer:
            self.asked.add(layer)
            self.src.prefetch(self.by_layer[layer])


def _check_source(src: Source, spec: ModelSpec) -> None:
    """Every canonical tensor is present with its canonical shape, and nothing else."""
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


def _holds_rank_dirs(d: Path) -> bool:
    return any(_RANK_DIR.match(c.name) for c in d.iterdir() if c.is_dir())


def detect(path: str | Path) -> bool:
    path = Path(path)
    try:
        it = find_iter_dir(path, _holds_rank_dirs) if path.is_dir() else None
    except (CheckpointError, OSError, ValueError):
        return True  # it looks like one (a tracker), and reading it will say what is wrong
    return it is not None and any((c / FILE).is_file() for c in it.iterdir() if _RANK_DIR.match(c.name))


def read_spec(path: str | Path) -> ModelSpec:
    return open_checkpoint(path).spec


def open_checkpoint(path: str | Path) -> Checkpoint:
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    iter_dir = find_iter_dir(root, _holds_rank_dirs)
    if iter_dir is None:
        raise CheckpointError(f"{root}: no Megatron rank directories (mp_rank_*) found")
    meta = read_sidecar(root, iter_dir)
    spec = read_spec_beside(root, iter_dir, meta, "Megatron checkpoint")
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
        has_embed = ROW["embedding"].legacy_name() in _model_dict(probe)
        pp, ep = (1, other) if has_embed or other == 1 else (other, 1)
    embed_file = next(f for k, f in found.items() if k[0] == 0 and all(x == 0 for x in k[1:2]))
    rows = _model_dict(embed_file).get(ROW["embedding"].legacy_name())
    pad = rows is not None and rows.shape[0] * tp != spec.vocab_size
    return Layout(tp, ep, pp, pad)


def _model_dict(file: Path) -> dict[str, StoredTensor]:
    obj = index(file)
    if not isinstance(obj, dict) or "model" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        hint = " (virtual pipeline stages 'model0', 'model1', ... are not supported)" if isinstance(obj, dict) and "model0" in obj else ""
        raise CheckpointError(f"{file}: expected a dict with a 'model' entry, got {keys}{hint}")
    out: dict[str, torch.Tensor] = {}
    for name, value in obj["model"].items():
        canon = mapping.normalise(name)
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
    the TE spelling of the mapping table, `_extra_state` dropped; the file is checked strictly."""
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


def list_tensors(path: str | Path) -> dict[str, Listed]:
    """`"<rank dir>/<name>"` -> shape, dtype, file, from the files' pickles (no tensor data read)."""
    ck = open_checkpoint(path)
    out: dict[str, Listed] = {}
    for key, file in ck.files.items():
        rd = ck.layout.rank_dir(*key)
        for name, t in ck.model(key).items():
            out[f"{rd}/{name}"] = Listed(tuple(t.shape), t.dtype, file)
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
            if not stored.same_bytes_as(loaded):
                raise CheckpointError(
                    f"{self.ck.files[key]}: tensor {name} differs from its copy in {self.ck.files[first_key]} "
                    "(replicated tensors must be bit-equal on every rank)")
        return loaded

    def warm(self, s: int, wanted: Callable[[str], bool]) -> None:
        """Read the tensors of stage s that are `wanted` (every file) into the page cache."""
        self.ahead.warm((t.path, t.offset, t.nbytes) for key in self.ck.files if key[1] == s
                        for name, t in self.ck.model(key).items() if wanted(name))


def _stream(ck: Checkpoint, dtype: torch.dtype) -> Stream:
    """The canonical stream, each row's Megatron tensor assembled from the rank files by its shard rule."""
    spec, lay, g = ck.spec, ck.layout, _Gather(ck)
    T, P, S = lay.tp, lay.ep, lay.pp
    last = {row.legacy_name() for row in ROWS if row.scope == LAST}

    def stage(row: Row, layer: int | None) -> tuple[int, int | None]:
        if layer is None:
            return (0 if row.scope == FIRST else S - 1), None
        return lay.stage_of(spec, layer)

    def fetch(row: Row, layer: int | None) -> torch.Tensor:
        s, i = stage(row, layer)
        name = row.legacy_name(i)
        if row.shard is Shard.VOCAB_ROWS:
            return vocab(name, s)
        if row.shard is Shard.REPLICATED:
            return g.copies(name, [(t, s, p) for t in range(T) for p in range(P)])
        return torch.cat([g.copies(name, [(t, s, p) for p in range(P)]) for t in range(T)], dim=row.shard.axis)

    def fetch_experts(row: Row, layer: int, put) -> None:
        s, i = lay.stage_of(spec, layer)
        for p in range(P):
            for k, e in enumerate(lay.experts_of(spec, p)):
                put(e, g.copies(row.legacy_name(i, k), [(t, s, p) for t in range(T)]))

    def vocab(name: str, s: int) -> torch.Tensor:
        """The real rows, filled shard by shard (no concatenated copy); padding rows must be zero."""
        keys = [[(t, s, p) for p in range(P)] for t in range(T)]
        stored = next(ck.model(k)[name] for k in keys[0] if k in ck.files)
        rows, width = stored.shape
        out = torch.empty(spec.vocab_size, width, dtype=stored.dtype)
        for t in range(T):
            a, b = t * rows, (t + 1) * rows
            if b <= spec.vocab_size:  # no padding rows: read straight into place
                g.copies(name, keys[t], out=out[a:b])
                continue
            shard = g.copies(name, keys[t])
            real, bad = mapping.unpad_vocab(shard, a, spec.vocab_size)
            if bad is not None:
                file = ck.files[next(k for k in sorted(ck.files) if k[0] == t and k[1] == s)]
                raise CheckpointError(f"{file}: tensor {name}: vocabulary padding row {bad} (of {rows * T}, real "
                                      f"vocabulary {spec.vocab_size}) is not zero")
            out[a:a + real.shape[0]] = real
            del shard, real  # not held while the next shard is read
        return out

    def warm(layer: int) -> None:
        """Read global layer `layer` (the last stage's rows after the last layer) ahead."""
        if layer < spec.num_layers:
            s, i = lay.stage_of(spec, layer)
            g.warm(s, mapping.in_layer(i))
        else:
            g.warm(S - 1, last.__contains__)

    warm(0)
    try:
        yield from mapping.restore_stream(spec, fetch, fetch_experts, dtype, on_layer=lambda layer: warm(layer + 1))
    finally:
        g.ahead.close()
