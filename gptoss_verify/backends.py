"""Which functions the model's blocks call: a backend's table, with bug-zoo faults swapped in.

This is the one module that knows both `model/` (the reference functions and the faults) and
`kernels/` (the fused ones), so neither has to import the other.
"""
from __future__ import annotations

from .model import REFERENCE, BlockFunctions
from .model.faults import FAULTS

BACKENDS = ("reference", "fused")


def backend_table(backend: str) -> BlockFunctions:
    """The reference functions, or the fused kernels in place of attention and the MoE (imported
    only when asked for: they need Triton)."""
    if backend == "reference":
        return REFERENCE
    if backend == "fused":
        from .kernels.attention import fused_attention
        from .kernels.moe import fused_moe
        return REFERENCE.replace(attention=fused_attention, moe=fused_moe)
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def block_functions(backend: str = "reference", faults: tuple[str, ...] | list[str] = ()) -> BlockFunctions:
    """The backend's table with each named fault's mutant in place of the reference function it
    replaces. A fault whose function the backend does not use (an attention or MoE fault under
    `fused`: the kernel stands there) changes nothing. Two faults on one function are refused."""
    unknown = [n for n in faults if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault {unknown[0]!r}; known: {', '.join(FAULTS)}")
    table = backend_table(backend)
    swaps: dict[str, str] = {}  # slot -> fault
    for name in dict.fromkeys(faults):
        for slot, fn in vars(table).items():
            if fn is FAULTS[name].replaces:
                if slot in swaps:
                    raise ValueError(f"faults {swaps[slot]!r} and {name!r} both replace {slot}; inject one of them")
                swaps[slot] = name
    return table.replace(**{slot: FAULTS[name].mutant for slot, name in swaps.items()})
