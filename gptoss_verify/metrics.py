"""Error measures between a tensor and its reference, each a plain function of two tensors.

Every measure is computed in float64 so that the measurement adds no error of its own.
`summarize` computes them all in one chunked pass on a chosen device, which is what full-width
runs use (traces live on the CPU; the arithmetic runs on the GPU). Which measure a comparison is
judged by is the tolerance table's business (`tolerances.py`, applied by `judge.py`).
"""
from __future__ import annotations

import dataclasses

import torch

MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (float64 tensor), down to the smallest normal's spacing."""
    finfo = torch.finfo(dtype)
    mag = x.abs().clamp_min(finfo.tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - MANTISSA_BITS[dtype])


def not_correctly_rounded_share(a: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """Share of elements farther than half a `dtype` spacing (plus fp32 slack) from the exact value:
    zero for an op computed wide and rounded once."""
    a, exact = a.detach().double(), exact.detach().to(a.device).double()
    bound = 0.5 * ulp(exact, dtype) * (1 + 2.0 ** -8)
    return float(((a - exact).abs() > bound).double().mean()) if a.numel() else 0.0


def same_expert_set(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """Per token (bool, the indices' leading shape): are the chosen expert sets equal (order ignored)?"""
    return (idx_a.sort(-1).values == idx_b.sort(-1).values.to(idx_a.device)).all(-1)


def set_agreement(idx_a: torch.Tensor, idx_b: torch.Tensor) -> float:
    """Share of tokens whose chosen expert sets are equal (order ignored)."""
    return float(same_expert_set(idx_a, idx_b).double().mean())


def argmax_agreement(logits_a: torch.Tensor, logits_ref: torch.Tensor) -> float:
    return float((logits_a.argmax(-1) == logits_ref.argmax(-1)).double().mean())


def kl_next_token(logits_ref: torch.Tensor, logits_a: torch.Tensor, reduce: str = "mean",
                  device: str | torch.device | None = None, rows: int = 256) -> float:
    """KL(softmax(ref) ‖ softmax(a)) in nats, per position, then the mean or the median over
    positions (the median is robust to the few tokens a routing near-tie flips). Computed in
    float64 on `device`, `rows` positions at a time."""
    device = logits_ref.device if device is None else device
    ref = logits_ref.detach().reshape(-1, logits_ref.shape[-1])
    a = logits_a.detach().reshape(-1, logits_a.shape[-1])
    parts = []
    for i in range(0, ref.shape[0], rows):
        p = torch.log_softmax(ref[i:i + rows].to(device, torch.float64), -1)
        q = torch.log_softmax(a[i:i + rows].to(device, torch.float64), -1)
        parts.append((p.exp() * (p - q)).sum(-1))
    kl = torch.cat(parts)
    return float(kl.median() if reduce == "median" else kl.mean())


def router_ties(logits: torch.Tensor, k: int, dtype: torch.dtype) -> int:
    """Tokens whose k-th and (k+1)-th largest router logits are within one `dtype` spacing:
    their expert choice is implementation-defined, so they are reported, not failed."""
    from .model.moe import count_router_ties
    return count_router_ties(logits, k, rel_gap=2.0 ** -MANTISSA_BITS[dtype])


@dataclasses.dataclass
class Summary:
    """Every measure of one (tensor, reference) pair."""
    max_abs: float
    scale: float      # max |reference|
    rel_l2: float
    cosine: float
    max_ulp: float

    @property
    def rel_max_abs(self) -> float:
        return self.max_abs / max(self.scale, 1e-300)


def summarize(a: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, device: str | torch.device | None = None,
              chunk: int = 1 << 25) -> Summary:
    """All measures of a against ref in one pass over chunks of `chunk` elements, in float64 on
    `device` (default: ref's device). NaN anywhere makes max_abs NaN."""
    if a.shape != ref.shape:
        raise ValueError(f"shape mismatch: {list(a.shape)} vs {list(ref.shape)}")
    device = ref.device if device is None else device
    a, ref = a.detach().reshape(-1), ref.detach().reshape(-1)
    acc = torch.zeros(7, dtype=torch.float64, device=device)  # max|d|, max|r|, Σd², Σr², Σa², Σar, max ulp
    for i in range(0, a.numel(), chunk):
        x = a[i:i + chunk].to(device=device, dtype=torch.float64)
        y = ref[i:i + chunk].to(device=device, dtype=torch.float64)
        d = (x - y).abs()
        part = torch.stack([d.max(), y.abs().max(), (d * d).sum(), (y * y).sum(), (x * x).sum(), (x * y).sum(),
                            (d / ulp(y, dtype)).max()])
        nan = torch.isnan(part[[0, 6]]).any()
        acc[[0, 1, 6]] = torch.maximum(acc[[0, 1, 6]], part[[0, 1, 6]])
        acc[2:6] += part[2:6]
        if nan:
            acc[0] = float("nan")
    v = acc.tolist()
    return Summary(max_abs=v[0], scale=v[1], rel_l2=(v[2] ** 0.5) / max(v[3] ** 0.5, 1e-300),
                   cosine=v[5] / max((v[3] * v[4]) ** 0.5, 1e-300), max_ulp=v[6])
