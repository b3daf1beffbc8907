"""The package's one spelling of dtypes: torch's own name without the `torch.` prefix.

Options (`--dtype bfloat16`), reports, tolerance keys and JSON all use it. File formats keep their
own codes (safetensors' `BF16`, `F32`), which live with their reader in `formats/safetensors_io.py`.
"""
from __future__ import annotations

import torch

# the dtypes a model can be run, checked or written in; a command offers a subset as `--dtype`
DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype | str) -> str:
    """`torch.bfloat16` -> `bfloat16` (any torch dtype, not only those in `DTYPES`); a name passes through."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
