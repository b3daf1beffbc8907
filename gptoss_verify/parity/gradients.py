"""Gradients: for one scalar loss on the logits, every parameter's gradient in ours against the oracle's."""
from __future__ import annotations

import dataclasses

import torch

from ..config import ModelSpec
from ..judge import check
from ..model import Transformer
from ..weights import random_weights


@dataclasses.dataclass
class GradientResult:
    name: str
    rel_l2: float
    bound: float
    passed: bool


def compare_gradients(spec: ModelSpec, dtype: torch.dtype, seed: int = 0, profile: str = "typical",
                      batch: int = 2, seq: int = 24, offset: int = 0) -> list[GradientResult]:
    """loss = Σ logits · R for a fixed random R; each side gets its own copy of the weights, so
    their gradients do not mix."""
    from ..oracles.hf import HFOracle

    base = random_weights(spec, seed, profile, dtype)
    ours = Transformer.from_state_dict(spec, {n: t.clone() for n, t in base.items()})
    oracle = HFOracle(spec, {n: t.clone() for n, t in base.items()})
    gen = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=gen)
    probe = torch.randn(batch, seq, spec.vocab_size, generator=gen, dtype=torch.float64).to(dtype)
    (ours(ids, offset) * probe).sum().backward()
    (oracle(ids, offset) * probe).sum().backward()
    ours_g = {n: p.grad for n, p in ours.named_parameters()}
    oracle_g = {n: p.grad for n, p in oracle.model.named_parameters()}
    missing = [n for n in base if ours_g.get(n) is None or oracle_g.get(n) is None]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[0]}")
    verdicts = {n: check("gradient", dtype, ours_g[n], oracle_g[n]) for n in base}
    return [GradientResult(n, v.error, v.bound, v.passed) for n, v in verdicts.items()]
