"""The diff corpus: real checkpoints of ours (make-checkpoint, convert) and copies of them with one
known transform applied to one tensor of one layer.

Two ways to corrupt, as a converter with a bug or a person with a script would:
- `rewrite`: read a checkpoint's canonical stream, apply the transform to some tensors, and write
  it with our writer for any layout (Megatron tp/ep, torch_dist, HF, OpenAI); MXFP4 bytes pass
  through an MXFP4 writer unchanged, dense input to an MXFP4 writer is encoded with the OCP rule;
- `edit_safetensors`: edit the tensors of an HF checkpoint's safetensors file in place (in a copy),
  any shape, without our writer's checks.
The transforms here are written from their definitions, independently of gptoss_verify.diff.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gptoss_verify.cli import main
from gptoss_verify.formats import canonical
from gptoss_verify.formats import layout as layouts

Fn = Callable[[torch.Tensor], torch.Tensor]
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def rewrite(src: Path, out: Path, to: str, edits: dict[str, Fn], *, dense: bool = False, spec=None, **options) -> Path:
    """SRC's canonical stream with `edits` (name -> transform) applied, written as layout `to`.
    `dense`: decode MXFP4 first (so a dense transform can reach expert weights)."""
    src_spec, stream = layouts.module(layouts.detect(src)).read(src)
    if dense:
        stream = canonical.to_dense(stream)
    hit = set()

    def edited():
        for name, t in stream:
            if name in edits:
                hit.add(name)
                t = edits[name](t)
            yield name, t
    layouts.module(to).write(edited(), spec or src_spec, out, **options)
    assert hit == set(edits), f"edits not applied: {set(edits) - hit}"
    return out


def edit_safetensors(src: Path, out: Path, edits: dict[str, Fn], config: dict | None = None) -> Path:
    """A copy of the single-file HF checkpoint SRC with tensors edited in its safetensors file
    (and config.json fields replaced by `config`)."""
    shutil.copytree(src, out)
    files = list(out.glob("*.safetensors"))
    assert len(files) == 1 and not (out / "model.safetensors.index.json").exists()
    tensors = load_file(files[0])
    for name, fn in edits.items():
        tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, files[0], metadata={"format": "pt"})
    if config:
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(config)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


# ---- transforms, on canonical tensors -------------------------------------------------------------
def transpose(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2).contiguous()


def swap_rows(i: int, j: int, dim: int = 0) -> Fn:
    def fn(t: torch.Tensor) -> torch.Tensor:
        idx = list(range(t.shape[dim]))
        idx[i], idx[j] = j, i
        return t.index_select(dim, torch.tensor(idx))
    return fn


def swap_heads(i: int, j: int, head_dim: int) -> Fn:
    """Swap head blocks i and j (rows of a q/k/v projection)."""
    def fn(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        out[i * head_dim:(i + 1) * head_dim] = t[j * head_dim:(j + 1) * head_dim]
        out[j * head_dim:(j + 1) * head_dim] = t[i * head_dim:(i + 1) * head_dim]
        return out
    return fn


def cycle_rows(rows: list[int], dim: int = 0) -> Fn:
    """B[rows[k]] = A[rows[k + 1]] (a cycle, not a swap)."""
    def fn(t: torch.Tensor) -> torch.Tensor:
        idx = list(range(t.shape[dim]))
        for k, r in enumerate(rows):
            idx[r] = rows[(k + 1) % len(rows)]
        return t.index_select(dim, torch.tensor(idx))
    return fn


def on_expert(e: int, fn: Fn) -> Fn:
    """`fn` applied to expert `e`'s slice only."""
    def apply(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        out[e] = fn(t[e])
        return out
    return apply


def to_interleaved(t: torch.Tensor) -> torch.Tensor:
    """[gate | up] halves -> interleaved (gate at even columns)."""
    half = t.shape[-1] // 2
    out = torch.empty_like(t)
    out[..., 0::2], out[..., 1::2] = t[..., :half], t[..., half:]
    return out


def to_halves(t: torch.Tensor) -> torch.Tensor:
    """Interleaved gate/up (gate at even columns) -> [gate | up]."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1).contiguous()


def negate_rows(rows: slice) -> Fn:
    def fn(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        out[rows] = -out[rows]
        return out
    return fn


def scale(c: float) -> Fn:
    return lambda t: (t.float() * c).to(t.dtype)


def offset(c: float) -> Fn:
    return lambda t: (t.float() + c).to(t.dtype)


def add_to_scales(k: int) -> Fn:
    return lambda s: (s.int() + k).to(torch.uint8)


def swap_nibbles(b: torch.Tensor) -> torch.Tensor:
    return ((b >> 4) | (b << 4)).to(torch.uint8)


def regroup_qkv(spec) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]:
    """Megatron's fused rows [q heads of g; k_g; v_g] split as if they were flat [Q; K; V]."""
    d, nq, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    qpk = nq // nkv

    def fn(q, k, v):
        blocks = list(q.split(d)) + list(k.split(d)) + list(v.split(d))
        grouped = []
        for g in range(nkv):
            grouped += blocks[g * qpk:(g + 1) * qpk] + [blocks[nq + g], blocks[nq + nkv + g]]
        fused = torch.cat(grouped)
        return fused[:nq * d], fused[nq * d:(nq + nkv) * d], fused[(nq + nkv) * d:]
    return fn


def requantize_one_exponent_low(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-encode MXFP4 values with every shared exponent one below the one stored (the OCP one):
    the codes are the nearest e2m1 magnitudes of the values at the smaller scale, saturating at 6."""
    lo, hi = (blocks & 0x0F).long(), (blocks >> 4).long()
    codes = torch.stack([lo, hi], dim=-1).flatten(-2)  # [..., G, 32], element order
    mag = E2M1[codes & 7]
    sign = codes & 8
    m = (mag * 2.0).clamp(max=6.0)  # the same value at a scale half as large, saturated
    new = (m[..., None] - E2M1).abs().argmin(-1) | sign
    packed = (new[..., 0::2] | (new[..., 1::2] << 4)).to(torch.uint8)
    live = blocks.reshape(*blocks.shape[:-1], -1).ne(0).any(-1)
    new_scales = torch.where(live, scales.int() - 1, scales.int()).to(torch.uint8)
    return packed, new_scales
