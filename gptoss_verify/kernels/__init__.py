"""Fused Triton kernels behind plain functions with the reference blocks' signatures.

Importable without a GPU; without one they run only under the Triton interpreter
(`TRITON_INTERPRET=1`, float32/float16 inputs).
"""


def fused_functions():
    """(attention, moe) of the fused backend, in the reference functions' signatures."""
    from .attention import fused_attention
    from .moe import fused_moe
    return fused_attention, fused_moe
