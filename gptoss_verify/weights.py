"""Seeded random weights in the canonical (HF-named, dense) state dict that exercise every branch.

transformers' own initialisation (std 0.02, zero expert biases, empty sinks) hides the bugs this
project exists to find, so the generator sets every scale on purpose:

- `typical`: non-zero biases everywhere, sinks of a few units, gate/up pre-activations wide
  enough that the SwiGLU clamp is active on a measurable share of elements.
- `stress`: sinks up to ±100, and on the heads whose sink is +100, query/key biases along the
  slowest-rotating RoPE pair that put their scores near +97 as well, so that a softmax without
  the max subtraction overflows to inf/inf where the true probabilities are ordinary;
  pre-activations far past the clamp; pairs of experts whose router rows differ in one element
  by one bf16 ulp (near-tied router logits).

Every value is rounded through bfloat16 once, so the same model exists exactly in bf16, float32
and float64, and a bf16 checkpoint holds it without loss.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from .config import ModelSpec
from .schema import canonical_shapes

PROFILES = ("typical", "stress")


def _draw(name: str, shape: tuple[int, ...], spec: ModelSpec, profile: str, gen: torch.Generator) -> torch.Tensor:
    """One tensor, in float32 on the generator's device, with a scale chosen so that its branch is exercised."""
    h, inter = spec.hidden_size, spec.intermediate_size
    stress = profile == "stress"
    dev = gen.device

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=dev) * std + mean

    def uniform(lo: float, hi: float, size=shape) -> torch.Tensor:
        return torch.empty(size, device=dev).uniform_(lo, hi, generator=gen)

    leaf = name.rsplit(".", 2)[-2:] if name.startswith("model.layers.") else [name]
    key = ".".join(leaf)
    if name in ("model.embed_tokens.weight",):
        return normal(1.0)
    if name == "lm_head.weight":
        return normal(1.0 / math.sqrt(h))
    if key.endswith("layernorm.weight") or name == "model.norm.weight":
        return normal(0.2, mean=1.0)
    if key.endswith("sinks"):
        if not stress:
            return uniform(-4.0, 4.0)
        # half the heads at ±(5..20), a quarter at ±100 (overflow without the max), the rest near 0
        mag = uniform(5.0, 20.0)
        mag[1::4] = uniform(0.0, 1.0, mag[1::4].shape)
        sign = torch.where(torch.rand(shape, generator=gen, device=dev) < 0.5, -1.0, 1.0)
        sign[::4] = 1.0
        mag[::4] = HUGE_SINK
        mag[2::8] = HUGE_SINK  # and some at −100
        sign[2::8] = -1.0
        return mag * sign
    if stress and key.endswith(("q_proj.bias", "k_proj.bias")):
        return _overflow_bias(key, shape, spec, gen)
    if key.endswith(("q_proj.weight", "k_proj.weight")):
        return normal(1.2 / math.sqrt(h))
    if key.endswith("v_proj.weight"):
        return normal(1.0 / math.sqrt(h))
    if key.endswith("o_proj.weight"):
        return normal(1.0 / math.sqrt(shape[1]))
    if key.endswith("router.weight"):
        w = normal(1.0 / math.sqrt(h))
        if stress:
            # pairs of experts whose rows differ in one element by one bf16 ulp: their logits differ
            # by ~1e-3 of a logit, a near-tie that bf16 rounding of the logits often turns into a tie
            w = w.to(torch.bfloat16).float()
            w[1::2] = w[0::2][: w[1::2].shape[0]]
            up = torch.tensor(1e9, dtype=torch.bfloat16, device=dev)
            w[1::2, 0] = torch.nextafter(w[1::2, 0].to(torch.bfloat16), up).float()
        return w
    if key.endswith("router.bias"):
        b = normal(0.5)
        if stress:
            b[1::2] = b[0::2][: b[1::2].shape[0]]
        return b
    if key.endswith("gate_up_proj"):
        # pre-activations ~N(0, s²): s = 3 clamps a few percent of elements, s = 20 most of them
        return normal((20.0 if stress else 3.5) / math.sqrt(h))
    if key.endswith("gate_up_proj_bias"):
        return normal(4.0 if stress else 1.0)
    if key.endswith("down_proj"):
        return normal(1.0 / math.sqrt(inter) / (4.0 if stress else 1.0))
    if key.endswith("bias"):
        return normal(0.5)
    raise KeyError(f"no generator rule for {name}")


HUGE_SINK = 100.0


def _overflow_bias(key: str, shape: tuple[int, ...], spec: ModelSpec, gen: torch.Generator) -> torch.Tensor:
    """q/k biases whose product, on the slowest RoPE pair (dims D/2−1 and D−1, nearly unrotated
    over thousands of positions), adds ≈ +97 to the scores of the heads whose sink is +100
    (every 4th query head; keys get the bias on every kv head)."""
    d = spec.head_dim
    bias = torch.randn(shape, generator=gen, device=gen.device) * 0.5
    per_head = bias.view(-1, d)
    # score contribution = 2·b² · concentration² / √D; solve for b so that it is ≈ 97
    b = math.sqrt(97.0 * math.sqrt(d) / (2 * spec.concentration ** 2))
    heads = range(0, per_head.shape[0], 4) if key.endswith("q_proj.bias") else range(per_head.shape[0])
    for h in heads:
        per_head[h, d // 2 - 1] = per_head[h, d - 1] = b
    return bias


def iter_random_weights(spec: ModelSpec, seed: int = 0, profile: str = "typical",
                        dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                        names=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, so a full-size checkpoint never sits in memory whole.
    Each tensor has its own generator seeded from (seed, name): the stream is reproducible in any
    order and any subset (e.g. `--layers N` on a big preset gives the first N layers of the full
    model). Tensors are drawn on `device` (a GPU draws full-width weights in seconds); CPU and CUDA
    generators give different, each reproducible, values. `names` (an iterable of canonical names)
    draws only those, in checkpoint order, with the values they have in the whole model."""
    if profile not in PROFILES:
        raise ValueError(f"profile: expected one of {PROFILES}, got {profile!r}")
    shapes = canonical_shapes(spec)
    if names is not None:
        wanted = set(names)
        unknown = wanted - shapes.keys()
        if unknown:
            raise KeyError(f"no canonical tensor named {sorted(unknown)[0]!r} in {spec.name}")
        shapes = {n: s for n, s in shapes.items() if n in wanted}
    for name, shape in shapes.items():
        gen = torch.Generator(device=device).manual_seed(_tensor_seed(seed, name))
        yield name, _draw(name, shape, spec, profile, gen).to(torch.bfloat16).to(dtype)


def random_weights(spec: ModelSpec, seed: int = 0, profile: str = "typical",
                   dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return dict(iter_random_weights(spec, seed, profile, dtype, device))


def _tensor_seed(seed: int, name: str) -> int:
    import hashlib
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
