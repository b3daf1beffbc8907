"""The bug zoo: faults that shipped in other GPT-OSS implementations, switchable in our model.

Each fault is a named deviation that the reference blocks consult through `active(name)`. The
parity harness must catch every one of them at the point named in `FAULTS`; a fault it cannot see
is a bug in the harness. Faults are set with the `inject(...)` context manager and are off otherwise.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

# name -> (where it shipped, the trace point where parity must catch it first)
FAULTS: dict[str, tuple[str, str]] = {
    "window-129": ("sliding window of W+1 keys: transformers #39408, mlx-lm #390", "attn_core"),
    "window-127": ("sliding window of W-1 keys: Megatron-Bridge #2656 inverse", "attn_core"),
    "sink-scaled": ("sink multiplied by the 1/sqrt(D) score scale", "attn_core"),
    "sink-dropped": ("sink column left out of the softmax: TransformerEngine #2541", "attn_core"),
    "sink-no-max": ("softmax without subtracting the row max (sink included): overflows", "attn_core"),
    "yarn-truncate": ("YaRN correction range rounded to 8/18: vLLM #27722, SGLang #14270", "q"),
    "yarn-no-concentration": ("cos/sin not multiplied by 0.1·ln(factor)+1", "q"),
    "rope-interleaved": ("rotation of pairs (2d, 2d+1) instead of (d, d+D/2): TensorRT-LLM #16378", "q"),
    "gate-clamp-symmetric": ("gate clamped on both sides: prime-rl #2365 review claim", "mlp_out"),
    "gate-up-halves": ("gate/up split in halves instead of even/odd interleave", "mlp_out"),
    "router-softmax-all": ("softmax over all experts, no renormalisation: torchtitan #2258", "topk_weights"),
    "norm-cast-first": ("RMSNorm casts to the model dtype before the weight (Llama order)", "attn_norm"),
    "norm-eps-1e-6": ("RMSNorm with the class default eps 1e-6 instead of 1e-5", "attn_norm"),
    "down-bias-after-weight": ("down bias added once after the weighted sum, unweighted", "mlp_out"),
}

_active: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("gptoss_faults", default=frozenset())


def active(name: str) -> bool:
    return name in _active.get()


@contextlib.contextmanager
def inject(*names: str) -> Iterator[None]:
    """Switch faults on for the duration of the block (they apply to the reference path only)."""
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault {unknown[0]!r}; known: {', '.join(FAULTS)}")
    token = _active.set(_active.get() | frozenset(names))
    try:
        yield
    finally:
        _active.reset(token)
