"""Layout-only synthetic checkpoints: random bytes in the exact published names, shapes and dtypes.

The branch-exercising generator (weights.py) plus MXFP4 encoding costs minutes per layer at full
width on a small CPU; tests of layouts and conversion throughput need the published shapes, not
meaningful numbers. Here MXFP4 blocks are random bytes shaped into what an OCP MX encoder emits
(`_as_encoded`): each block's first element of magnitude 4 or 6, so the block's
largest value sets its scale; such blocks are a fixed point of decode -> encode, so a round trip
through a dense layout (Megatron) comes back byte for byte, as for real checkpoints. Each scale is
a plausible E8M0 exponent (2^-8 .. 2^-2), and every float tensor has random
bf16 bit patterns with the exponent held to magnitudes in [2^-8, 2^-4) (finite, all mantissas and
both signs). Random integers are cheap where normal draws are not (a 20B embedding in about a
second instead of fifteen). Each tensor has its own generator seeded from (seed, index).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..config import ModelSpec
from .canonical import canonical_table


def _bf16_bits(rng: np.random.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    r = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    exponent = (np.uint16(127 - 8) + ((r >> np.uint16(7)) & np.uint16(3))) << np.uint16(7)
    bits = (r & np.uint16(0x807F)) | exponent
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


def _as_encoded(raw: np.ndarray) -> np.ndarray:
    """[..., 16] random bytes -> bytes an OCP encoder could have written: the low nibble of byte 0
    (element 0) gets magnitude code 6 or 7 (4 or 6), its sign kept; every other nibble stays."""
    raw[..., 0] |= np.uint8(0x06)
    return raw


def iter_layout_weights(spec: ModelSpec, seed: int = 0, mxfp4: bool = True,
                        dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, torch.Tensor]]:
    for i, (name, (shape, dt)) in enumerate(canonical_table(spec, mxfp4=mxfp4, dtype=dtype).items()):
        rng = np.random.default_rng([seed, i])
        if dt == torch.uint8 and name.endswith("_scales"):
            yield name, torch.from_numpy(rng.integers(127 - 8, 127 - 1, size=shape, dtype=np.uint8))
        elif dt == torch.uint8:
            yield name, torch.from_numpy(_as_encoded(rng.integers(0, 256, size=shape, dtype=np.uint8)))
        else:
            yield name, _bf16_bits(rng, shape).to(dtype)
