"""Error measures between a tensor and its reference, each a plain function of two tensors.

Every measure is computed in float64 so that the measurement adds no error of its own.
"""
from __future__ import annotations

import torch

MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {list(a.shape)} vs {list(b.shape)}")
    return a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()


def max_abs(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = _pair(a, ref)
    return float((a - ref).abs().max()) if a.numel() else 0.0


def scale(ref: torch.Tensor) -> float:
    """The magnitude errors are measured against: the largest |value| of the reference (≥ tiny)."""
    return max(float(ref.detach().abs().max().double()) if ref.numel() else 0.0, 1e-300)


def rel_max_abs(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a − ref| / max|ref|: a max error that does not depend on the tensor's units."""
    return max_abs(a, ref) / scale(ref)


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = _pair(a, ref)
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def cosine(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = _pair(a, ref)
    denom = (a.norm() * ref.norm()).clamp_min(1e-300)
    return float((a.flatten() @ ref.flatten()) / denom)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (float64 tensor), down to the smallest normal's spacing."""
    finfo = torch.finfo(dtype)
    mag = x.abs().clamp_min(finfo.tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - MANTISSA_BITS[dtype])


def max_ulp(a: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest |a − ref| in units of `dtype`'s spacing at the reference value."""
    a, ref = _pair(a, ref)
    return float(((a - ref).abs() / ulp(ref, dtype)).max()) if a.numel() else 0.0


def not_correctly_rounded_share(a: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """Share of elements farther than half a `dtype` spacing (plus fp32 slack) from the exact value:
    zero for an op computed wide and rounded once."""
    a, exact = _pair(a, exact)
    bound = 0.5 * ulp(exact, dtype) * (1 + 2.0 ** -8)
    return float(((a - exact).abs() > bound).double().mean()) if a.numel() else 0.0


def set_agreement(idx_a: torch.Tensor, idx_b: torch.Tensor) -> float:
    """Share of tokens whose chosen expert sets are equal (order ignored)."""
    a, b = idx_a.sort(-1).values, idx_b.sort(-1).values
    return float((a == b).all(-1).double().mean())


def argmax_agreement(logits_a: torch.Tensor, logits_ref: torch.Tensor) -> float:
    return float((logits_a.argmax(-1) == logits_ref.argmax(-1)).double().mean())


def kl_next_token(logits_ref: torch.Tensor, logits_a: torch.Tensor, reduce: str = "mean") -> float:
    """KL(softmax(ref) ‖ softmax(a)) in nats, per position, then the mean or the median over
    positions (the median is robust to the few tokens a routing near-tie flips)."""
    p = torch.log_softmax(logits_ref.detach().double().cpu(), -1)
    q = torch.log_softmax(logits_a.detach().double().cpu(), -1)
    kl = (p.exp() * (p - q)).sum(-1).flatten()
    return float(kl.median() if reduce == "median" else kl.mean())


def router_ties(logits: torch.Tensor, k: int, dtype: torch.dtype) -> int:
    """Tokens whose k-th and (k+1)-th largest router logits are within one `dtype` spacing:
    their expert choice is implementation-defined, so they are reported, not failed."""
    if logits.shape[-1] <= k:
        return 0
    top = logits.detach().double().topk(k + 1, dim=-1).values
    gap = top[..., k - 1] - top[..., k]
    return int((gap <= ulp(top[..., k - 1], dtype)).sum())
