"""YaRN rotary embedding (docs/numerics.md §4): inv_freq, the concentration, and the half-split rotation.

Angles are computed in float32 by default, as both references do whatever the model dtype
(docs/numerics.md §4); `angle_dtype=torch.float64` gives exact angles, to measure how far fp32 angles drift.
"""
from __future__ import annotations

import math

import torch

from ..config import ModelSpec


def correction_range(spec: ModelSpec, truncate: bool | None = None) -> tuple[float, float]:
    """The YaRN ramp bounds (low, high) over the D/2 frequency indices."""
    d = spec.head_dim

    def correction_dim(rotations: float) -> float:
        return d * math.log(spec.rope_original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(spec.rope_theta))

    low, high = correction_dim(spec.rope_beta_fast), correction_dim(spec.rope_beta_slow)
    if spec.rope_truncate if truncate is None else truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0.0), min(high, d - 1.0)


def inv_freq(spec: ModelSpec, dtype: torch.dtype = torch.float32, truncate: bool | None = None) -> torch.Tensor:
    """inv_freq[i] = interp·ramp + extrap·(1 − ramp), extrap = θ^(−2i/D), interp = extrap / factor."""
    d = spec.head_dim
    extrap = 1.0 / spec.rope_theta ** (torch.arange(0, d, 2, dtype=dtype) / d)
    if spec.rope_factor == 1.0:
        return extrap
    interp = extrap / spec.rope_factor
    low, high = correction_range(spec, truncate)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=dtype) - low) / (high - low)).clamp(0, 1)
    return interp * ramp + extrap * (1 - ramp)


def cos_sin(spec: ModelSpec, positions: torch.Tensor, dtype: torch.dtype,
            angle_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position·inv_freq, times the concentration, computed in `angle_dtype`, then cast.

    positions: integer tensor of any shape; returns two tensors of shape [*positions.shape, D/2].
    """
    freqs = positions.to(angle_dtype)[..., None] * inv_freq(spec, angle_dtype).to(positions.device)
    return (freqs.cos() * spec.concentration).to(dtype), (freqs.sin() * spec.concentration).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (d, d + D/2) of x [..., seq, heads, D] by cos/sin [..., seq, D/2]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
