"""RMSNorm as GPT-OSS computes it: normalise in fp32 (or wider), multiply by the weight there, cast last."""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Low precisions are widened to float32 inside; float64 stays float64 (the truth path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    wide = x.to(compute_dtype(x.dtype))
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(wide.dtype) * normed).to(x.dtype)
